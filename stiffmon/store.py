"""The monitor's store: per-run series of scalars, matrices, curves and spectra (no Textual here).

Live messages and replayed ones take the same path: :meth:`Store.apply`. A ``columns`` batch is
appended column by column (vectorised), and ``step_time`` is derived from its row times when the
batch does not carry it. Heavy measurements are kept at full resolution; each scalar series keeps
at most ``max_points`` points and beyond that halves itself, keeping the minimum and the maximum
of every four consecutive points, so spikes survive decimation. Derived quantities (break-even,
peaks, ξ) live in :mod:`stiffmon.derive` and are computed from the store, so they work on replays
too.

A run's state in words (live, stalled, lost …) is :class:`~stiffmon.run_health.Health`; how a
hung training loop is told from a gone agent, :class:`~stiffmon.run_health.Progress`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np
import numpy.typing as npt

from stiffmon import derive
from stiffmon import protocol as p
from stiffmon.run_health import (
    LOST_SECONDS,
    STALL_SECONDS,
    STEP_STALL_FACTOR,
    STEP_STALL_FLOOR,
    Health,
    Progress,
    duration,
)
from stiffmon.series import Series, last_or

__all__ = [
    "LOST_SECONDS",
    "MEASUREMENTS",
    "STALL_SECONDS",
    "STEP_STALL_FACTOR",
    "STEP_STALL_FLOOR",
    "Health",
    "Progress",
    "RunData",
    "Series",
    "Snapshot",
    "Status",
    "Store",
    "duration",
]

T = TypeVar("T")
Status = Literal["live", "stalled", "finished", "replay"]
MAX_EVENTS = 10_000  # per run; older events are dropped (counted in events_dropped)
MAX_SKIP_STEPS = 5_000  # per measurement kind
MEASUREMENTS = ("gram", "sharpness")


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
    events_dropped: int = 0
    diverged_step: int | None = None
    disabled: dict[str, str] = field(default_factory=dict)  # metric -> reason
    errors: dict[str, str] = field(default_factory=dict)  # metric -> last error message
    skip_reasons: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> reason -> n
    skip_steps: dict[str, list[int]] = field(default_factory=dict)  # kind -> steps
    nonfinite_steps: dict[str, list[int]] = field(default_factory=dict)  # kind -> steps
    memo: dict[str, tuple[object, object]] = field(default_factory=dict, repr=False, compare=False)
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
    column_tail: tuple[int, float] | None = None  # (step, time) of the last columns row
    progress: Progress = field(default_factory=Progress)

    @property
    def name(self) -> str:
        return self.hello.name if self.hello and self.hello.name else self.run

    @property
    def optimizer(self) -> dict[str, object]:
        return dict(self.hello.optimizer) if self.hello else {}

    @property
    def lr(self) -> float:
        """η of param group 0 at the last step (the agent's ``lr/0``); else the hello's."""
        return last_or(self.scalars.get("lr/0"), self.optimizer.get("lr"))

    @property
    def momentum(self) -> float:
        """β of param group 0 at the last step, as ``lr``: the agent's ``momentum/0`` (SGD's
        momentum or β1 of Adam's betas); else the hello's ``momentum`` or ``beta1``."""
        opt = self.optimizer
        return last_or(self.scalars.get("momentum/0"), opt.get("momentum", opt.get("beta1")))

    @property
    def batch_size(self) -> int | None:
        """B from the hello; else the largest of the agent's per-step ``batch_size`` scalar.

        The agent takes B from the logits passed to ``step()`` when ``Agent(batch_size=…)`` is not
        given; the largest, since an epoch's last batch may be smaller.
        """
        if self.hello is not None and self.hello.batch_size is not None:
            return self.hello.batch_size
        series = self.scalars.get("batch_size")
        if series is None or not len(series):
            return None
        b = float(np.nanmax(series.values)) if np.isfinite(series.values).any() else math.nan
        return int(b) if math.isfinite(b) and b > 0 else None

    def status(self, now: float | None = None) -> Status:
        """live, stalled (no message for 3 s, or no new step for long while heartbeats still
        come: see the module), finished (bye seen) or replay."""
        if self.finished:
            return "finished"
        if self.replay:
            return "replay"
        now = time.monotonic() if now is None else now
        if now - self.last_seen > STALL_SECONDS or self.progress.hung(now):
            return "stalled"
        return "live"

    def health(self, now: float | None = None, *, ended: bool = False) -> Health:
        """The run's state and problems in words (``ended``: its replay reached the end)."""
        now = time.monotonic() if now is None else now
        problems = []
        if self.diverged_step is not None:
            problems.append(f"diverged at step {self.diverged_step:,}")
        problems += [f"{m} disabled: {why}" for m, why in self.disabled.items()]
        status = self.status(now)
        idle = now - self.last_seen
        why = ""  # why a run is stalled
        if status == "finished":
            state, text = "finished", "finished" if self.bye_reason != "exit" else "exited"
        elif status == "replay":
            state, text = ("ended", "no bye (crashed?)") if ended else ("replay", "replay")
        elif status == "stalled" and idle > LOST_SECONDS:
            state, text = "lost", f"no bye (lost {duration(idle)})"
        elif status == "stalled" and idle > STALL_SECONDS:
            state, text = "stalled", f"stalled {duration(idle)}"
            why = f"no message for {STALL_SECONDS:g} s"
        elif status == "stalled":  # heartbeats come, steps do not: the training loop hangs
            since, step = duration(self.progress.since_step(now)), f"{self.progress.step:,}"
            state, text = "stalled", f"stalled {since} (no step since {step}; agent alive)"
            why = f"no step since {step} for {since}; agent alive"
        else:
            state, text = "live", "live"
        bad = self.diverged_step is not None or state in ("lost", "ended")
        level = "error" if bad else ("warning" if problems or state == "stalled" else "ok")
        return Health(state, text, tuple(problems), level, why)

    def coverage(self, kind: str) -> tuple[int, int]:
        """(done, skipped) measurements of ``kind`` (gram / sharpness) so far.

        From the agent's cumulative ``coverage/<kind>/done|skipped`` scalars; without them, the
        measurements received and the ``measurement-skipped`` events.
        """
        done, skipped = self.last(f"coverage/{kind}/done"), self.last(f"coverage/{kind}/skipped")
        if math.isnan(done):
            if kind == "gram":
                done = max((len(v) for v in self.matrices.values()), default=0)
            else:
                s = self.scalars.get("sharpness/lambda1_h")
                done = len(s) * (s.stride if s is not None else 1) if s is not None else 0
        if math.isnan(skipped):
            skipped = sum(self.skip_reasons.get(kind, {}).values())
        return int(done), int(skipped)

    def skipped_at(self, kind: str) -> list[int]:
        """Steps at which a ``kind`` measurement was due and skipped."""
        steps = list(self.skip_steps.get(kind, ()))
        s = self.scalars.get(f"coverage/{kind}/skipped")
        if s is not None and len(s) > 1:
            grew = np.flatnonzero(np.diff(s.values) > 0) + 1
            steps += s.steps[grew].tolist()
        return sorted(set(steps))

    def stale_steps(self, kind: str | None = None) -> list[int]:
        """Steps from which the run's earlier values are no longer current (sorted): where it
        diverged and, for a measurement ``kind``, where that measurement was skipped because
        the model was not finite (every skip of ``kind`` when that was the only reason)."""
        steps = {self.diverged_step} if self.diverged_step is not None else set()
        if kind is not None:
            steps.update(self.nonfinite_steps.get(kind, ()))
            if set(self.skip_reasons.get(kind, {})) == {"not-finite"}:
                steps.update(self.skipped_at(kind))
        return sorted(steps)

    def note_event(self, ev: p.Event) -> None:
        """Keep an event (bounded) and what it says about the run's health."""
        self.events.append(ev)
        if len(self.events) > MAX_EVENTS:
            del self.events[: MAX_EVENTS // 10]
            self.events_dropped += MAX_EVENTS // 10
        metric = str(ev.attrs.get("metric", ev.attrs.get("kind", "metric")))
        if ev.code == "nan-loss":
            if self.diverged_step is None or ev.step < self.diverged_step:
                self.diverged_step = ev.step
        elif ev.code == "metric-error":
            self.errors[metric] = ev.message
        elif ev.code == "metric-disabled":
            self.disabled[metric] = self.errors.get(metric, ev.message)
        elif ev.code == "measurement-skipped":
            reason = str(ev.attrs.get("reason", "?"))
            counts = self.skip_reasons.setdefault(metric, {})
            n = ev.attrs.get("skipped")  # the agent's running count (events are log-spaced)
            counts[reason] = int(n) if isinstance(n, int | float) else counts.get(reason, 0) + 1
            steps = self.skip_steps.setdefault(metric, [])
            if len(steps) < MAX_SKIP_STEPS:
                steps.append(ev.step)
            if reason == "not-finite":
                bad = self.nonfinite_steps.setdefault(metric, [])
                if len(bad) < MAX_SKIP_STEPS:
                    bad.append(ev.step)

    def data_key(self, *names: str) -> tuple[tuple[int, int, int], ...]:
        """Changes whenever one of the named series gains (or thins) points: a memo key."""
        out = []
        for n in names:
            s = self.scalars.get(n)
            out.append(
                (len(s), s.stride, int(s.steps[-1])) if s is not None and len(s) else (0, 0, 0)
            )
        return tuple(out)

    def memoized(self, name: str, key: object, compute: Callable[[], T]) -> T:
        """``compute()``, cached under ``name`` until ``key`` changes (views use it to run costly
        derivations such as the break-even once per new measurement, not once per frame)."""
        hit = self.memo.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]  # type: ignore[return-value]
        value = compute()
        self.memo[name] = (key, value)
        return value

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
            t0 = float(msg.times[0]) if isinstance(msg, p.Columns) else msg.t
            rd.first_t = t0 if math.isnan(rd.first_t) else min(rd.first_t, t0)
            rd.last_t = msg.t if math.isnan(rd.last_t) else max(rd.last_t, msg.t)
        self._note_progress(rd.progress, msg, rd.last_seen)
        if isinstance(msg, p.Scalars):
            for name, value in zip(msg.names, msg.values.tolist(), strict=True):
                s = rd.scalars.get(name)
                if s is None:
                    s = rd.scalars[name] = Series(self.max_points)
                s.append(msg.step, msg.t, value)
                if name == "loss" and not math.isfinite(value) and rd.diverged_step is None:
                    rd.diverged_step = msg.step
        elif isinstance(msg, p.Columns):
            self._apply_columns(rd, msg)
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
            rd.note_event(msg)
        elif isinstance(msg, p.Heartbeat):
            rd.dropped = msg.dropped
        elif isinstance(msg, p.Bye):
            rd.finished = True
            rd.bye_reason = msg.reason
        self.version += 1

    @staticmethod
    def _note_progress(prog: Progress, msg: p.Message, now: float) -> None:
        """The agent's clock and the loop's progress (a heartbeat's step: the highest the agent
        has published; it counts once a step came, a hello's never)."""
        if isinstance(msg, p.Columns) and msg.steps.size:
            last = float(msg.times[-1])
            prog.note_time(max(msg.t, last), now)
            prog.advance(int(msg.steps[-1]), last, (int(msg.steps[0]), float(msg.times[0])))
            return
        prog.note_time(msg.t, now)
        if isinstance(msg, p.Hello | p.Bye) or (isinstance(msg, p.Heartbeat) and prog.step < 0):
            return
        prog.advance(msg.step, msg.t)

    def _apply_columns(self, rd: RunData, msg: p.Columns) -> None:
        """Append a batch of per-step scalars; ``step_time`` is derived from the row times."""
        for name, values in zip(msg.names, msg.values, strict=True):
            s = rd.scalars.get(name)
            if s is None:
                s = rd.scalars[name] = Series(self.max_points)
            s.extend(msg.steps, msg.times, values)
            if name == "loss" and rd.diverged_step is None:
                bad = np.flatnonzero(~np.isfinite(values))
                if bad.size:
                    rd.diverged_step = int(msg.steps[bad[0]])
        if msg.sparse or "step_time" in msg.names:  # sparse: values logged at some steps
            return
        # The wall time of step s is the time between its row and the row of step s - 1.
        steps, times = msg.steps, msg.times
        prev = rd.column_tail
        if prev is not None and prev[0] == steps[0] - 1:
            steps_all = np.concatenate(([prev[0]], steps))
            times_all = np.concatenate(([prev[1]], times))
        else:
            steps_all, times_all = steps, times
        rd.column_tail = (int(steps[-1]), float(times[-1]))
        follows = np.diff(steps_all) == 1
        if follows.any():
            s = rd.scalars.get("step_time")
            if s is None:
                s = rd.scalars["step_time"] = Series(self.max_points)
            s.extend(steps_all[1:][follows], times_all[1:][follows], np.diff(times_all)[follows])

    def extend(self, msgs: Iterable[p.Message], *, replay: bool = False) -> None:
        for m in msgs:
            self.apply(m, replay=replay)
