"""One run as the monitor knows it: :class:`RunData` and its measurements (:class:`Snapshot`).

:class:`~stiffmon.store.Store` fills one :class:`RunData` per run from the messages it applies;
the views read the run's series, events and health from it. Derived quantities (break-even,
peaks, ξ) live in :mod:`stiffmon.derive`; :class:`RunData` computes them from its series, so they
work on replays too.

A run's state in words (live, stalled, lost …) is :class:`~stiffmon.run_health.Health`; how a
hung training loop is told from a gone agent, :class:`~stiffmon.run_health.Progress`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np
import numpy.typing as npt

from stiffmon import derive, resume_chain
from stiffmon import protocol as p
from stiffmon.process_check import WriterState
from stiffmon.replay_stalls import StallLog
from stiffmon.run_health import (
    FOLLOW_QUIET_SECONDS,
    LOST_SECONDS,
    STALL_SECONDS,
    Health,
    Progress,
    duration,
)
from stiffmon.series import Series, last_or

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
    disabled_at: dict[str, tuple[int, float]] = field(default_factory=dict)  # (step, time)
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
    cut_off: str = ""  # the address it comes through, while its connection is lost
    first_step: int | None = None  # the lowest step any message carried (None: none yet)
    continues: RunData | None = field(default=None, repr=False, compare=False)  # resumed from
    resume_noted: bool = False  # a ``resumed`` event was added (stiffmon.resume_chain)
    stall_log: StallLog = field(default_factory=StallLog)  # stalls told from the step times
    stall_events: dict[int, p.Event] = field(default_factory=dict)  # a replay's, by stall index

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

    def param_groups(self, prefix: str = "lr") -> list[int]:
        """The param groups ``i`` with a per-step ``prefix/i`` column (``lr/0``, ``lr/1``, …)."""
        head = f"{prefix}/"
        return sorted(
            int(n[len(head) :])
            for n, s in self.scalars.items()
            if n.startswith(head) and n[len(head) :].isdigit() and len(s)
        )

    def distinct_groups(self, prefix: str = "lr") -> list[list[int]]:
        """The param groups of :meth:`param_groups`, those whose ``prefix/i`` has the same value
        at every step as an earlier group's listed with it (``[[0, 2], [1]]``); ``[[0]]`` when
        every group has the same schedule. Computed again only when a column changed."""
        groups = self.param_groups(prefix)
        names = [f"{prefix}/{i}" for i in groups]

        def compute() -> list[list[int]]:
            out: list[list[int]] = []
            for i, name in zip(groups, names, strict=True):
                s = self.scalars[name]
                for members in out:
                    o = self.scalars[f"{prefix}/{members[0]}"]
                    if np.array_equal(o.steps, s.steps) and np.array_equal(
                        o.values, s.values, equal_nan=True
                    ):
                        members.append(i)
                        break
                else:
                    out.append([i])
            return out

        key = (tuple(names), self.data_key(*names))
        return self.memoized(f"groups/{prefix}", key, compute)

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

    def health(
        self, now: float | None = None, *, ended: bool = False, writer: WriterState | None = None
    ) -> Health:
        """The run's state and problems in words.

        Args:
            now: Monotonic time (default: now).
            ended: Its replay reached the end (a file, not followed).
            writer: For a file at its end (followed or not), or a live run that has gone
                quiet, whether the process writing it runs (on this machine; else
                ``unknown``).
        """
        now = time.monotonic() if now is None else now
        problems = []
        if self.diverged_step is not None:
            problems.append(f"diverged at step {self.diverged_step:,}")
        problems += [self._disabled_text(m) for m in self.disabled]
        status = self.status(now)
        idle = now - self.last_seen
        why = ""  # why a run is stalled
        pid = self.hello.pid if self.hello is not None else 0  # the writer's, of a file
        if status == "finished" and self.bye_reason.startswith("error"):
            # an uncaught exception in the training script (or the agent's context manager)
            error = self.bye_reason.partition(":")[2].strip() or "an error"
            state, text = "ended", f"ended by {error}"
        elif status == "finished":
            ended_as = {
                "exit": "exited",
                "terminated": "terminated (SIGTERM)",
                "interrupted": "interrupted (Ctrl-C)",
            }
            state, text = "finished", ended_as.get(self.bye_reason, "finished")
        elif status in ("replay", "stalled") and writer == "gone":  # killed, or crashed hard
            state, text = "ended", f"no bye (writer pid {pid} gone)"
        elif status == "replay" and ended and writer == "alive":  # read before it is written
            state, text = "replay", f"no bye yet (writer pid {pid} still running)"
        elif status == "replay" and ended:
            state, text = "ended", "no bye (crashed?)"
        elif status == "replay" and writer is not None and idle > FOLLOW_QUIET_SECONDS:
            alive = "; writer alive" if writer == "alive" else ""
            state, text = "stalled", f"no new record for {duration(idle)}{alive}"
            why = f"the file has not grown for {duration(idle)}{alive}"
        elif status == "replay":
            state, text = "replay", "replay"
        elif status == "stalled" and self.cut_off and idle > STALL_SECONDS:
            state = "lost" if idle > LOST_SECONDS else "stalled"  # the run may go on: no "no bye"
            text = f"disconnected {duration(idle)} ({self.cut_off})"
            why = f"connection to {self.cut_off} lost"
        elif status == "stalled" and idle > LOST_SECONDS:
            state, text = "lost", f"no bye (lost {duration(idle)})"
        elif status == "stalled" and idle > STALL_SECONDS:
            state, text = "stalled", f"stalled {duration(idle)}"
            why = f"no message for {STALL_SECONDS:g} s"
        elif status == "stalled":  # heartbeats come, steps do not: the training loop hangs
            since, step = duration(self.progress.since_step(now)), f"{self.progress.step:,}"
            state, text = "stalled", f"stalled {since} (no step since {step}; agent alive)"
            why = f"no step since {step} for {since}; agent alive"
        elif self.progress.measuring and self.progress.since_step(now) > self.progress.limit():
            # no new step for long, but the loop is in a measurement: busy, not hung
            since = duration(self.progress.since_step(now))
            state, text = "live", f"live (measuring {self.progress.measuring}, {since})"
        else:
            state, text = "live", "live"
        bad = self.diverged_step is not None or state in ("lost", "ended")
        level = "error" if bad else ("warning" if problems or state == "stalled" else "ok")
        return Health(state, text, tuple(problems), level, why)

    def _disabled_text(self, metric: str) -> str:
        return f"{metric} disabled: {self.disabled[metric]}"

    def problem_at(self, problem: str) -> tuple[int, float] | None:
        """(step, time) of what made one of :meth:`health`'s ``problems`` (None: not one); a
        replayed run's ``run appeared …`` at its first step (not where the monitor first looked:
        a replay at full speed has applied many steps by then)."""
        if self.replay and problem.startswith("run appeared") and self.first_step is not None:
            return self.first_step, self.first_t
        if self.diverged_step is not None and problem.startswith("diverged at step"):
            loss = self.series("loss")
            if loss is not None and len(loss):
                i = min(len(loss) - 1, int(loss.steps.searchsorted(self.diverged_step)))
                return self.diverged_step, float(loss.times[i])
            return self.diverged_step, self.last_t
        for metric, at in self.disabled_at.items():
            if problem == self._disabled_text(metric):
                return at
        return None

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
            self.disabled_at[metric] = (ev.step, ev.t)
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
        out: list[tuple[int, int, int]] = []
        for r in resume_chain.chain(self):  # and the runs a resumed one continues
            out.append((id(r), 0, 0))
            for n in names:
                s = r.scalars.get(n)
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
        precond = bool(len(self.scalars.get("sharpness/lambda1_precond", ())))
        name = "sharpness/lambda1_precond" if precond else derive.LAMBDA1_H
        thr_name = derive.threshold_series(precond)
        steps, _, values = resume_chain.joined(self, name)  # across a resumption's seam
        if not len(steps):
            return derive.no_break_even(name)
        early = resume_chain.root_first_step(self) == 0  # not past the early phase alone
        thr = self.aligned(thr_name, steps)
        return derive.break_even(steps, values, thr, series=name, early_peak=early)

    def break_even_k(self) -> derive.BreakEven:
        """The early-phase peak of λ1_K (no threshold applies to the noise covariance)."""
        name = "noise/lambda1_k"
        steps, _, values = resume_chain.joined(self, name)
        if not len(steps):
            return derive.no_break_even(name)
        early = resume_chain.root_first_step(self) == 0
        return derive.break_even(steps, values, None, series=name, early_peak=early)

    def aligned(self, name: str, steps: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """Series ``name`` at ``steps``: its last value at or before each step (NaN before it);
        before a resumed run's first step, the run it continues (:mod:`stiffmon.resume_chain`)."""
        s_steps, _, s_values = resume_chain.joined(self, name)
        if not len(s_steps):
            return np.full(steps.shape, math.nan)
        i = np.searchsorted(s_steps, steps, side="right") - 1
        return np.where(i >= 0, s_values[np.maximum(i, 0)], math.nan)

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
