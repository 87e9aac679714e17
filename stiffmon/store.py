"""The monitor's store: per-run series of scalars, matrices, curves and spectra (no Textual here).

Live messages and replayed ones take the same path: :meth:`Store.apply`. A ``columns`` batch is
appended column by column (vectorised), and ``step_time`` is derived from its row times when the
batch does not carry it. Heavy measurements are kept at full resolution; each scalar series keeps
at most ``max_points`` points and beyond that halves itself, keeping the minimum and the maximum
of every four consecutive points, so spikes survive decimation. Derived quantities (break-even,
peaks, ξ) live in :mod:`stiffmon.derive` and are computed from the store, so they work on replays
too.

One run's data is :class:`~stiffmon.run_data.RunData` (re-exported here, with :class:`Snapshot`).
A run's state in words (live, stalled, lost …) is :class:`~stiffmon.run_health.Health`; how a
hung training loop is told from a gone agent, :class:`~stiffmon.run_health.Progress`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import numpy as np

from stiffmon import protocol as p
from stiffmon import resume_chain
from stiffmon.replay_stalls import stall_event
from stiffmon.run_data import MAX_EVENTS as MAX_EVENTS
from stiffmon.run_data import MAX_SKIP_STEPS as MAX_SKIP_STEPS
from stiffmon.run_data import MEASUREMENTS, RunData, Snapshot, Status
from stiffmon.run_health import (
    LOST_SECONDS,
    STALL_SECONDS,
    STEP_STALL_FACTOR,
    STEP_STALL_FLOOR,
    Health,
    Progress,
    duration,
)
from stiffmon.series import Series

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


ENDED_WELL = frozenset({"", "closed", "exit", "done"})  # a bye's reasons for a run that finished
# (a stall open at an ``interrupted`` / ``terminated`` / ``error: …`` bye was stopped in the hang)


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
        self.unlinked: set[str] = set()  # runs from a step after 0, continuing none known

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
            if not isinstance(msg, p.Hello):  # its step is no step of the loop
                first = msg.step
                if isinstance(msg, p.Columns) and msg.steps.size:
                    first = int(msg.steps[0])
                rd.first_step = first if rd.first_step is None else min(rd.first_step, first)
            t0 = float(msg.times[0]) if isinstance(msg, p.Columns) else msg.t
            rd.first_t = t0 if math.isnan(rd.first_t) else min(rd.first_t, t0)
            rd.last_t = msg.t if math.isnan(rd.last_t) else max(rd.last_t, msg.t)
        self._note_stalls(rd, msg, replay)  # and the run's progress
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
        if isinstance(msg, p.Columns | p.Scalars):
            if rd.continues is None and (rd.first_step or rd.run in self.unlinked):
                self._link_resumed(rd)
            for other in [self.runs[r] for r in self.unlinked if r != rd.run]:
                self._link_resumed(other)  # rd may be the run it continues, read after it
        self.version += 1

    def _link_resumed(self, rd: RunData) -> None:
        """Link a run recorded from a step after 0 to the run it continues, and say so in its log
        (an info event ``resumed`` at its first step; :mod:`stiffmon.resume_chain`)."""
        if rd.hello is None or rd.first_step is None:
            return
        if rd.first_step == 0:  # its history came after its live steps: it resumes nothing
            self.unlinked.discard(rd.run)
            return
        o = resume_chain.find_continued(rd, self.runs.values())
        if o is None and (rd.resume_noted or not rd.replay):  # live: its history may come
            if not rd.resume_noted:
                self.unlinked.add(rd.run)
            return
        if o is None:
            self.unlinked.add(rd.run)
        else:
            self.unlinked.discard(rd.run)
        rd.continues = o
        rd.resume_noted = True
        attrs: dict[str, str | int | float | bool | None] = {"first_step": rd.first_step}
        if o is not None:
            attrs |= {"continues": o.run, "continues_steps": f"{o.first_step}-{o.last_step}"}
        rd.note_event(
            p.Event(
                run=rd.run,
                seq=-1,
                step=rd.first_step,
                t=rd.first_t,
                level="info",
                code="resumed",
                message=resume_chain.resume_note(rd, o),
                attrs=attrs,
            )
        )

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
        if isinstance(msg, p.Heartbeat):
            prog.measuring = msg.measuring
        if isinstance(msg, p.Hello | p.Bye) or (isinstance(msg, p.Heartbeat) and prog.step < 0):
            return
        prog.advance(msg.step, msg.t)
        if isinstance(msg, p.Scalars | p.Matrix | p.Curve | p.Spectrum):  # made in the loop
            prog.alive(msg.step, msg.t)  # after a measurement: busy until then, not hung

    @staticmethod
    def _note_stalls(rd: RunData, msg: p.Message, replay: bool) -> None:
        """Stalls told from the step times (:mod:`stiffmon.replay_stalls`): the gaps before and
        between ``msg``'s steps (before the run's progress moves over them), and how long the
        agent has talked since its last step (after); a replay logs each as a warning event
        (live, the monitor sees a stall as it happens and says so itself)."""
        prog, log = rd.progress, rd.stall_log
        if isinstance(msg, p.Columns):
            changed = log.rows(prog, msg.steps, msg.times)
        elif isinstance(msg, p.Hello | p.Heartbeat | p.Bye):
            changed = []
        else:
            changed = log.rows(prog, [msg.step], [msg.t])
        Store._note_progress(prog, msg, rd.last_seen)
        if isinstance(msg, p.Bye):  # after the last step: the time up to a bye is no hang,
            last = log.stalls[-1] if log.stalls else None  # unless the run was stopped in it
            if last is not None and not last.resumed and msg.reason in ENDED_WELL:
                log.stalls.pop()
                ev = rd.stall_events.pop(len(log.stalls), None)
                rd.events = [e for e in rd.events if e is not ev]
        elif not isinstance(msg, p.Hello):
            t = max(msg.t, float(msg.times[-1])) if isinstance(msg, p.Columns) else msg.t
            changed = changed + [s for s in log.quiet(prog, t) if s not in changed]
        if not replay:
            return
        for stall in changed:
            i = log.stalls.index(stall)
            ev, old = stall_event(rd.run, stall), rd.stall_events.get(i)
            rd.stall_events[i] = ev
            j = next((k for k, e in enumerate(rd.events) if e is old), None)
            if j is None:
                rd.note_event(ev)
            else:
                rd.events[j] = ev

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
