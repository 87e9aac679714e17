"""When heavy metrics run: small immutable schedules over the training step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@runtime_checkable
class Schedule(Protocol):
    """Decides whether a measurement is due at a step."""

    def due(self, step: int) -> bool:
        """True if a measurement is due at ``step`` (0-based)."""
        ...


def next_due(schedule: Schedule, step: int) -> int | None:
    """The first step at or after ``step`` that ``schedule`` is due at (None: never again).

    The agent asks only at that step, so a step with nothing due costs one comparison. The
    built-in schedules answer in O(1); another object without a ``next_due`` method is asked
    :meth:`Schedule.due` at every step (it answers ``step`` itself).
    """
    ask = getattr(schedule, "next_due", None)
    return step if ask is None else ask(step)


@dataclass(frozen=True)
class Never:
    """Never measure."""

    def due(self, step: int) -> bool:
        return False

    def next_due(self, step: int) -> int | None:
        return None


@dataclass(frozen=True)
class EveryK:
    """Steps 0, k, 2k, … (from ``start``)."""

    k: int
    start: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"EveryK needs k >= 1, got {self.k}")

    def due(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.k == 0

    def next_due(self, step: int) -> int:
        if step <= self.start:
            return self.start
        return self.start + -(-(step - self.start) // self.k) * self.k


@dataclass(frozen=True)
class LogSpaced:
    """Steps 0 and round(10^(i/per_decade)) for i = 0, 1, …: about ``per_decade`` per decade.

    Dense early in training, where the break-even point and the early sharpness peak lie.
    """

    per_decade: int = 10

    def __post_init__(self) -> None:
        if self.per_decade < 1:
            raise ValueError(f"LogSpaced needs per_decade >= 1, got {self.per_decade}")

    def due(self, step: int) -> bool:
        if step <= 1:
            return True
        centre = self.per_decade * math.log10(step)
        return any(
            round(10 ** (i / self.per_decade)) == step
            for i in range(math.floor(centre) - 1, math.ceil(centre) + 2)
        )

    def next_due(self, step: int) -> int:
        if step <= 1:
            return max(step, 0)
        i = max(math.floor(self.per_decade * math.log10(step)) - 1, 0)
        while round(10 ** (i / self.per_decade)) < step:  # non-decreasing in i
            i += 1
        return round(10 ** (i / self.per_decade))


@dataclass(frozen=True)
class FirstNThenEveryK:
    """Every step below ``n``, then every ``k`` steps."""

    n: int
    k: int

    def __post_init__(self) -> None:
        if self.n < 0 or self.k < 1:
            raise ValueError(f"FirstNThenEveryK needs n >= 0 and k >= 1, got {self.n}, {self.k}")

    def due(self, step: int) -> bool:
        return step < self.n or step % self.k == 0

    def next_due(self, step: int) -> int:
        step = max(step, 0)
        return step if step < self.n else -(-step // self.k) * self.k


def parse_schedule(spec: Schedule | int | str | None) -> Schedule:
    """A schedule from a spec.

    ``None`` or ``"never"``: never; an int k or ``"every:k"``: :class:`EveryK`; ``"log:m"``:
    :class:`LogSpaced`; ``"first:n,every:k"``: :class:`FirstNThenEveryK`; a schedule object is
    returned as is.

    Raises:
        ValueError: For an unknown spec.
    """
    if spec is None:
        return Never()
    if isinstance(spec, bool):
        raise ValueError(f"not a schedule: {spec!r}")
    if isinstance(spec, int):
        return EveryK(spec)
    if isinstance(spec, Schedule) and not isinstance(spec, str):
        return spec
    text = str(spec).strip().lower().replace(" ", "")
    try:
        if text == "never":
            return Never()
        if text.startswith("every:"):
            return EveryK(int(text.split(":", 1)[1]))
        if text.startswith("log:"):
            return LogSpaced(int(text.split(":", 1)[1]))
        if text.startswith("first:") and ",every:" in text:
            a, b = text.split(",every:")
            return FirstNThenEveryK(int(a.split(":", 1)[1]), int(b))
    except ValueError as exc:
        raise ValueError(f"bad schedule {spec!r}: {exc}") from exc
    raise ValueError(
        f"unknown schedule {spec!r}: use an int, 'every:K', 'log:M', 'first:N,every:K' or 'never'"
    )


KINDS = ("gram", "sharpness", "density")


class MeasurementPlan:
    """The three heavy kinds' schedules: what is due at a step, in which order, and when next.

    The order is fair: the kind that last went ahead longest ago is asked first (one never
    measured first of all), so that a cheap kind cannot spend the headroom at every due step
    while a costly one waits. It depends only on which measurements went ahead, which is the
    same on every rank of a sharded agent.

    Args:
        gram: Schedule of the Gram measurement (stiffness, noise).
        sharpness: Schedule of the sharpness measurement.
        density: Schedule of the Hessian density measurement.
    """

    def __init__(self, gram: Schedule, sharpness: Schedule, density: Schedule) -> None:
        self.schedules = (gram, sharpness, density)
        self.last_run: dict[str, int] = {}

    def due(self, step: int) -> list[str]:
        """The kinds due at ``step``, longest waiting first."""
        due = [k for k, s in zip(KINDS, self.schedules, strict=True) if s.due(step)]
        return sorted(due, key=lambda k: self.last_run.get(k, -1))

    def ran(self, kind: str, step: int) -> None:
        """Note that a ``kind`` measurement went ahead at ``step``."""
        self.last_run[kind] = step

    def next_after(self, step: int) -> float:
        """The first step after ``step`` at which a kind may be due (inf: none ever)."""
        nxt = [next_due(s, step + 1) for s in self.schedules]
        return min((n for n in nxt if n is not None), default=math.inf)
