"""The agent's overhead budget: when a due measurement may run, and the coverage bookkeeping.

``overhead_cap`` c bounds the whole run's slowdown: with the agent, training takes at most
(1 + c) × its own time. The agent's cost so far is everything it spent on the training thread
and beside it: the heavy measurements' wall time m, the time ``Agent.step()`` itself took (the
per-step stream) s and the publisher thread's CPU time u. Since the training's own time is the
elapsed time less that cost, a due heavy measurement runs only while

    m + w × (s + u) + last_cost[kind] <= c / (1 + c) × elapsed,

where ``last_cost[kind]`` (the previous measurement of that kind) predicts the next one. Before
the first one of a kind, a Hessian measurement whose products are counted in advance (the
density: runs × steps + trace samples) is priced at that many products at the cost of one in the
last Hessian measurement (a density costs 3–20 × a warm sharpness: priced at the costliest
measurement so far, the first one overshot a 5 % cap's 10,000-step run by ~1 %); anything
else at the costliest measurement made so far and ``elapsed`` is the wall time since
the agent started. The stream's weight w = :data:`STREAM_WEIGHT` charges what the stream costs
the training beside its own time: ``step()`` runs between the training's steps and leaves their
caches cold, and the publisher thread's bursts take a core from the training's threads. On the
benchmark's 2 ms CPU steps the stream slowed the run by 1.2–2.4 × its counted time (a
measurement's after-effect, by contrast, is ~3 % of its own time: the steps after one are not
measurably slower). Counted once, a 5 % cap gave 1.052–1.064 × runs.

The step-0 Gram measurement (stiffness and noise at initialisation, the cheapest kind) always
runs; its cost counts, so the next measurements wait until the run has paid for it. The other
kinds due at step 0 wait for the budget like any later one: a cold-start sharpness costs ~10 × a
Gram, which would alone be several percent of a short run. Every due measurement counts as done
or skipped (``coverage``); skips are said (an ``event`` and a log line) at 1, 2, 5, 10, 20, ...
per reason.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from stiffmon_agent.schedules import KINDS
from stiffmon_agent.userlog import log_spaced

log = logging.getLogger("stiffmon_agent")


STREAM_WEIGHT = 2.0
"""Seconds charged per second of the per-step stream's own cost (``step()`` + publisher CPU)."""


class MeasurementBudget:
    """Overhead budget, measurement costs and coverage counters of one agent.

    Args:
        overhead_cap: Largest slowdown of the run (a fraction of its own time); None or ≥ 1: no cap.
        publishing_seconds: Returns the CPU time the publisher thread has spent so far.
        event: Publishes an ``event`` message: ``event(code, message, level=..., **attrs)``.

    Attributes:
        start: ``time.perf_counter()`` when the budget (the agent) started.
        measure_seconds: Wall time spent in heavy measurements so far.
        step_seconds: Wall time spent in ``Agent.step()`` outside the measurements so far.
        last_cost: Seconds of the last measurement of each kind.
        skipped: Measurements skipped to stay under the cap.
        coverage: ``[done, skipped]`` due measurements of each kind.
        skips: Skips per ``(kind, reason)``.
        who: The prefix of its console lines (the agent sets ``stiffmon [run name]``).
    """

    def __init__(
        self,
        overhead_cap: float | None,
        publishing_seconds: Callable[[], float],
        event: Callable[..., None],
    ) -> None:
        self.overhead_cap = overhead_cap
        self._publishing_seconds = publishing_seconds
        self._event = event
        self.measure_seconds = 0.0
        self.step_seconds = 0.0
        self.last_cost = dict.fromkeys(KINDS, 0.0)
        self._measured: set[str] = set()
        self.hvp_seconds: float | None = None  # one Hessian-vector product, last measured
        self.skipped = 0
        self.coverage = {kind: [0, 0] for kind in KINDS}  # done, skipped
        self.skips: dict[tuple[str, str], int] = {}  # (kind, reason) -> count
        self.start = time.perf_counter()
        self.who = "stiffmon"

    def within(self, kind: str, step: int, hvps: int = 0) -> bool:
        """Whether a ``kind`` measurement due at ``step`` fits in the budget (``hvps``: the
        Hessian-vector products it will use at most, 0 if not known in advance)."""
        if (step == 0 and kind == "gram") or self.overhead_cap is None or self.overhead_cap >= 1.0:
            return True
        return self.spent() + self.predicted_cost(kind, hvps) <= self.allowance()

    def predicted_cost(self, kind: str, hvps: int = 0) -> float:
        """The last cost of ``kind``; before its first, ``hvps`` products at the last measured
        cost of one, else the costliest measurement so far (0 before any: the run's first
        measurement is not held back by a guess)."""
        if kind in self._measured:
            return self.last_cost[kind]
        if hvps > 0 and self.hvp_seconds is not None:
            return hvps * self.hvp_seconds
        return max(self.last_cost.values(), default=0.0)

    def spent(self) -> float:
        """Seconds the agent has cost the run so far: its measurements, and ``step()`` and the
        publisher at :data:`STREAM_WEIGHT` × their own time."""
        stream = self.step_seconds + self._publishing_seconds()
        return self.measure_seconds + STREAM_WEIGHT * stream

    def shares(self) -> tuple[float, float]:
        """What the stream (at its weight) and the measurements have cost so far, as fractions
        of the training's own time (the elapsed time less :meth:`spent`)."""
        spent = self.spent()
        own = max(time.perf_counter() - self.start - spent, 1e-9)
        return (spent - self.measure_seconds) / own, self.measure_seconds / own

    def allowance(self) -> float:
        """Seconds the agent may have cost by now: c / (1 + c) of the elapsed time."""
        cap = self.overhead_cap
        if cap is None:
            return math.inf
        return cap / (1.0 + cap) * (time.perf_counter() - self.start)

    def record_cost(self, kind: str, seconds: float, hvps: int = 0) -> None:
        """Charge a measurement (made, skipped inside or failed) of ``seconds`` to the budget;
        ``hvps``: the Hessian-vector products it used (prices the next kinds' first ones)."""
        self.measure_seconds += seconds
        self.last_cost[kind] = seconds
        self._measured.add(kind)
        if hvps > 0:
            self.hvp_seconds = seconds / hvps

    def done(self, kind: str) -> None:
        """Count a due measurement made."""
        self.coverage[kind][0] += 1

    def failed(self, kind: str) -> None:
        """Count a due measurement lost to an error (the metric-error event says why)."""
        self.coverage[kind][1] += 1

    def skip(self, kind: str, reason: str, detail: str = "", **extra: Any) -> None:
        """Count a due measurement not made; say so at 1, 2, 5, 10, 20, ... skips of a reason
        (``detail``: what the last one said, e.g. which weight is not finite; ``extra``: more
        attributes of the event, e.g. the bytes needed and free)."""
        self.coverage[kind][1] += 1
        n = self.skips[(kind, reason)] = self.skips.get((kind, reason), 0) + 1
        if not log_spaced(n):
            return
        done = self.coverage[kind][0]
        attrs: dict[str, Any] = {}
        if reason == "overhead-cap":
            stream, measure = self.shares()
            attrs = {"stream_share": stream, "measure_share": measure}
            why = (
                f"to keep the agent's slowdown of the run under {self.overhead_cap:.0%}: "
                f"so far the per-step stream costs {stream:.1%} and the measurements "
                f"{measure:.1%} of the training's time"
            )
        elif reason == "disabled":
            why = f"because {kind} is disabled after an error"
        elif detail:
            why = f"because {detail}"
        else:
            why = f"({reason})"
        attrs.update(extra)
        msg = f"skipping due {kind} measurements {why} ({n} skipped so far, {done} done)"
        self._event(
            "measurement-skipped",
            msg,
            level="warning",
            kind=kind,
            metric=kind,
            reason=reason,
            skipped=n,
            done=done,
            **attrs,
        )
        log.info(f"{self.who}: {msg}")

    def coverage_scalars(self, kinds: Iterable[str]) -> dict[str, Any]:
        """``coverage/<kind>/{done,skipped}`` of ``kinds``, as published after a due step."""
        return {
            f"coverage/{k}/{w}": self.coverage[k][i]
            for k in kinds
            for i, w in enumerate(("done", "skipped"))
        }
