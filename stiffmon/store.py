"""The monitor's store: per-run series of scalars, matrices, curves and spectra (no Textual here).

Live messages and replayed ones take the same path: :meth:`Store.apply`. Heavy measurements are
kept at full resolution; each scalar series keeps at most ``max_points`` points and beyond that
halves itself, keeping the minimum and the maximum of every four consecutive points, so spikes
survive decimation. Derived quantities (break-even, peaks, ξ) live in :mod:`stiffmon.derive` and
are computed from the store, so they work on replays too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from stiffmon import derive
from stiffmon import protocol as p

Status = Literal["live", "stalled", "finished", "replay"]
STALL_SECONDS = 3.0


class Series:
    """A scalar series (step, wall time, value) with bounded memory and min/max decimation."""

    __slots__ = ("_n", "_steps", "_times", "_values", "max_points", "stride")

    def __init__(self, max_points: int = 100_000) -> None:
        self.max_points = max(8, max_points)
        self._steps = np.empty(1024, dtype=np.int64)
        self._times = np.empty(1024, dtype=np.float64)
        self._values = np.empty(1024, dtype=np.float64)
        self._n = 0
        self.stride = 1  # how many raw points one kept point stands for, roughly

    def __len__(self) -> int:
        return self._n

    def append(self, step: int, t: float, value: float) -> None:
        if self._n == self._steps.shape[0]:
            cap = min(self._n * 2, self.max_points + 4)
            for name in ("_steps", "_times", "_values"):
                arr = getattr(self, name)
                new = np.empty(cap, dtype=arr.dtype)
                new[: self._n] = arr[: self._n]
                setattr(self, name, new)
        self._steps[self._n] = step
        self._times[self._n] = t
        self._values[self._n] = value
        self._n += 1
        if self._n > self.max_points:
            self._decimate()

    def _decimate(self) -> None:
        """Keep the min and the max (in step order) of every group of four points, and the first."""
        n = self._n - self._n % 4
        v = self._values[:n].reshape(-1, 4)
        nan = np.isnan(v)
        lo = np.argmin(np.where(nan, np.inf, v), axis=1)
        hi = np.argmax(np.where(nan, -np.inf, v), axis=1)
        same = lo == hi  # a flat (or all-NaN) group: keep two neighbours
        hi = np.where(same, np.where(lo < 3, lo + 1, lo - 1), hi)
        first, second = np.minimum(lo, hi), np.maximum(lo, hi)
        base = np.arange(v.shape[0]) * 4
        keep = np.unique(np.concatenate([[0], base + first, base + second]))  # first point stays
        keep = np.concatenate([keep, np.arange(n, self._n)])
        m = keep.shape[0]
        self._steps[:m] = self._steps[keep]
        self._times[:m] = self._times[keep]
        self._values[:m] = self._values[keep]
        self._n = m
        self.stride *= 2

    @property
    def steps(self) -> npt.NDArray[np.int64]:
        return self._steps[: self._n]

    @property
    def times(self) -> npt.NDArray[np.float64]:
        return self._times[: self._n]

    @property
    def values(self) -> npt.NDArray[np.float64]:
        return self._values[: self._n]

    def last(self) -> float:
        """Last value (NaN if empty)."""
        return float(self._values[self._n - 1]) if self._n else math.nan


@dataclass
class Snapshot:
    """One heavy measurement (matrix, curve or spectrum message) of a run."""

    step: int
    t: float
    msg: p.Matrix | p.Curve | p.Spectrum


@dataclass
class RunData:
    """Everything the monitor knows about one run."""

    run: str
    index: int
    hello: p.Hello | None = None
    scalars: dict[str, Series] = field(default_factory=dict)
    matrices: dict[str, list[Snapshot]] = field(default_factory=dict)
    curves: dict[str, list[Snapshot]] = field(default_factory=dict)
    spectra: dict[str, list[Snapshot]] = field(default_factory=dict)
    events: list[p.Event] = field(default_factory=list)
    last_seen: float = 0.0
    last_step: int = 0
    first_t: float = math.nan
    last_t: float = math.nan
    dropped: int = 0
    finished: bool = False
    bye_reason: str = ""
    replay: bool = False
    visible: bool = True
    max_points: int = 100_000

    @property
    def name(self) -> str:
        return self.hello.name if self.hello and self.hello.name else self.run

    @property
    def optimizer(self) -> dict[str, object]:
        return dict(self.hello.optimizer) if self.hello else {}

    @property
    def lr(self) -> float:
        s = self.scalars.get("lr/0")
        if s is not None and len(s):
            return s.last()
        v = self.optimizer.get("lr")
        return float(v) if isinstance(v, int | float) else math.nan

    @property
    def momentum(self) -> float:
        v = self.optimizer.get("momentum", self.optimizer.get("beta1"))
        return float(v) if isinstance(v, int | float) else math.nan

    @property
    def batch_size(self) -> int | None:
        return self.hello.batch_size if self.hello else None

    def status(self, now: float | None = None) -> Status:
        """live, stalled (no message for 3 s), finished (bye seen) or replay."""
        if self.finished:
            return "finished"
        if self.replay:
            return "replay"
        now = time.monotonic() if now is None else now
        return "live" if now - self.last_seen <= STALL_SECONDS else "stalled"

    def series(self, name: str) -> Series | None:
        return self.scalars.get(name)

    def break_even(self) -> derive.BreakEven:
        """The run's break-even marker (:func:`stiffmon.derive.break_even`).

        Judged on the preconditioned sharpness and its threshold when the run publishes them
        (adaptive optimizers), else on λ1_H and 2/η (or the momentum / Nesterov threshold).
        """
        name, thr_name = "sharpness/lambda1_precond", "sharpness/threshold_precond"
        if not len(self.scalars.get(name, ())):
            name, thr_name = derive.LAMBDA1_H, "sharpness/threshold"
        lam = self.scalars.get(name)
        if lam is None or not len(lam):
            return derive.no_break_even(name)
        return derive.break_even(
            lam.steps, lam.values, self.aligned(thr_name, lam.steps), series=name
        )

    def break_even_k(self) -> derive.BreakEven:
        """The early-phase peak of λ1_K (no threshold applies to the noise covariance)."""
        name = "noise/lambda1_k"
        lam = self.scalars.get(name)
        if lam is None or not len(lam):
            return derive.no_break_even(name)
        return derive.break_even(lam.steps, lam.values, None, series=name)

    def aligned(self, name: str, steps: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """Series ``name`` at ``steps``: its last value at or before each step (NaN before it)."""
        s = self.scalars.get(name)
        if s is None or not len(s):
            return np.full(steps.shape, math.nan)
        i = np.searchsorted(s.steps, steps, side="right") - 1
        return np.where(i >= 0, s.values[np.maximum(i, 0)], math.nan)

    def mean_after(self, name: str, be: derive.BreakEven) -> float:
        """Mean of series ``name`` over the measurements after a confirmed break-even."""
        s = self.scalars.get(name)
        return derive.mean_after(s.steps, s.values, be) if s is not None else math.nan

    def peak(self, name: str) -> float:
        s = self.scalars.get(name)
        return derive.peak(s.values) if s is not None else math.nan

    def last(self, name: str) -> float:
        s = self.scalars.get(name)
        return s.last() if s is not None else math.nan


class Store:
    """All runs, keyed by run id, in order of appearance.

    Attributes:
        version: Increases with every change; views redraw only when it moved.
        malformed: Bad frames counted by the sources feeding the store (assigning sets the
            sources' count) plus the messages :meth:`apply` rejected.
    """

    def __init__(self, max_points: int = 100_000) -> None:
        self.runs: dict[str, RunData] = {}
        self.version = 0
        self.source_malformed = 0  # counted by the sources (sockets, files)
        self.rejected = 0  # decoded messages that apply() could not take
        self.max_points = max_points

    @property
    def malformed(self) -> int:
        """Bad frames counted by the sources plus messages the store rejected."""
        return self.source_malformed + self.rejected

    @malformed.setter
    def malformed(self, value: int) -> None:  # a source reports its own running count
        self.source_malformed = value

    def run(self, run_id: str) -> RunData:
        rd = self.runs.get(run_id)
        if rd is None:
            rd = RunData(run_id, len(self.runs), max_points=self.max_points)
            self.runs[run_id] = rd
        return rd

    def apply(self, msg: p.Message, *, replay: bool = False, now: float | None = None) -> None:
        """Add one message; one that cannot be stored is counted as malformed, never raised."""
        try:
            self._apply(msg, replay, now)
        except Exception:
            self.rejected += 1
            self.version += 1

    def _apply(self, msg: p.Message, replay: bool, now: float | None) -> None:
        rd = self.run(msg.run)
        rd.replay = rd.replay or replay
        rd.last_seen = time.monotonic() if now is None else now
        if msg.KIND != "heartbeat":
            rd.last_step = max(rd.last_step, msg.step)
            rd.first_t = msg.t if math.isnan(rd.first_t) else min(rd.first_t, msg.t)
            rd.last_t = msg.t if math.isnan(rd.last_t) else max(rd.last_t, msg.t)
        if isinstance(msg, p.Scalars):
            for name, value in zip(msg.names, msg.values.tolist(), strict=True):
                s = rd.scalars.get(name)
                if s is None:
                    s = rd.scalars[name] = Series(self.max_points)
                s.append(msg.step, msg.t, value)
        elif isinstance(msg, p.Matrix):
            rd.matrices.setdefault(msg.name, []).append(Snapshot(msg.step, msg.t, msg))
        elif isinstance(msg, p.Curve):
            rd.curves.setdefault(msg.name, []).append(Snapshot(msg.step, msg.t, msg))
        elif isinstance(msg, p.Spectrum):
            rd.spectra.setdefault(msg.name, []).append(Snapshot(msg.step, msg.t, msg))
        elif isinstance(msg, p.Hello):
            rd.hello = msg
            rd.finished = False
        elif isinstance(msg, p.Event):
            rd.events.append(msg)
        elif isinstance(msg, p.Heartbeat):
            rd.dropped = msg.dropped
        elif isinstance(msg, p.Bye):
            rd.finished = True
            rd.bye_reason = msg.reason
        self.version += 1

    def extend(self, msgs: Iterable[p.Message], *, replay: bool = False) -> None:
        for m in msgs:
            self.apply(m, replay=replay)
