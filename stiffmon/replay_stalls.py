"""Stalls of a run told from its recorded step times, by the live monitor's rule.

Live, a run whose agent still talks is stalled once no new step came for longer than

    limit = max(STEP_STALL_FLOOR, STEP_STALL_FACTOR × median(recent seconds per step))

(:class:`~stiffmon.run_health.Progress`). A replay has no "now" to compare with, but it has the
time of every step: a gap ``t[k+1] - t[k] > limit`` between consecutive recorded steps (the
limit as the pace was known before the gap) is a stall at step ``k`` of ``t[k+1] - t[k]``
seconds, which the live monitor showed as ``stalled`` from ``t[k] + limit`` on. Between
recorded steps ``k < j`` further apart (a run that publishes only some steps), the steps in
between are taken at the typical pace: the stall is ``t[j] - t[k] - (j - k - 1) × pace`` (a
sparse recording is no stall for its gaps alone). A run whose
messages (heartbeats, a bye) go on past ``t[k] + limit`` without a new step is stalled at ``k``
for as long as they do (not resumed), unless its heartbeats say it is measuring; the time a
measurement took up to its last message is no gap (:meth:`Progress.alive`). The same
derivation runs on live data, so ``stiffmon summary`` says the stalls of a live run too; only a
replay logs each as an event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from stiffmon import protocol as p
from stiffmon.run_health import Progress, duration

STALL_CODE = "monitor"  # a derived stall is the monitor's word, as live (attrs: ``derived``)


@dataclass
class Stall:
    """One stretch without a new step.

    Attributes:
        step: The last step before the gap.
        t: Its agent time.
        seconds: How long no new step came (so far, while not ``resumed``).
        limit: The stall limit at the time (seconds).
        resumed: Whether a later step came.
    """

    step: int
    t: float
    seconds: float
    limit: float
    resumed: bool = False

    def words(self) -> str:
        """``stalled: no step since 150 for 12s (from the recorded step times; stalled after 10s
        without a step)``; ``… for 40s so far …`` while not resumed (the live log's words)."""
        so_far = "" if self.resumed else " so far"
        return (
            f"stalled: no step since {self.step:,} for {duration(self.seconds)}{so_far} "
            f"(from the recorded step times; stalled after {duration(self.limit)} without a step)"
        )


@dataclass
class StallLog:
    """A run's stalls, oldest first, as its rows come (see the module).

    Attributes:
        stalls: Every stall so far.
        changed: Stalls added or updated by the last call (the store logs them on a replay).
    """

    stalls: list[Stall] = field(default_factory=list)
    changed: list[Stall] = field(default_factory=list)

    def _note(self, step: int, t: float, seconds: float, limit: float, resumed: bool) -> None:
        last = self.stalls[-1] if self.stalls else None
        if last is not None and last.step == step and not last.resumed:
            last.seconds, last.resumed = max(last.seconds, seconds), resumed
            stall = last
        else:
            stall = Stall(step, t, seconds, limit, resumed)
            self.stalls.append(stall)
        if stall not in self.changed:
            self.changed.append(stall)

    def rows(self, prog: Progress, steps: npt.ArrayLike, times: npt.ArrayLike) -> list[Stall]:
        """New rows (steps, agent times), before ``prog`` advances over them: the gaps longer
        than ``prog``'s limit, after its last step and between the rows. Returns the stalls
        added or updated."""
        self.changed = []
        limit = prog.limit()
        s, t = np.asarray(steps, np.int64), np.asarray(times, np.float64)
        if prog.step < 0 or not math.isfinite(limit) or not s.size:
            return self.changed
        keep = s > prog.step
        s = np.concatenate(([prog.step], s[keep]))
        t = np.concatenate(([prog.t], t[keep]))
        pace = prog.pace()
        gaps = np.diff(t) - (np.diff(s) - 1) * pace  # the other steps of a gap at the pace
        for i in np.flatnonzero(gaps > limit).tolist():  # False for NaN times
            self._note(int(s[i]), float(t[i]), float(gaps[i]), limit, True)
        return self.changed

    def quiet(self, prog: Progress, t: float) -> list[Stall]:
        """The agent spoke at its time ``t`` (after ``prog`` took the message): an open stall
        when that is more than the limit past the last step. Returns the stalls added or
        updated."""
        self.changed = []
        limit = prog.limit()
        quiet = t - prog.t
        # False for NaN times and an unknown pace; a measuring loop is busy, not hung
        if prog.step >= 0 and quiet > limit and not prog.measuring:
            self._note(prog.step, prog.t, quiet, limit, False)
        return self.changed

    def longest(self) -> Stall | None:
        return max(self.stalls, key=lambda s: s.seconds, default=None)

    def summary(self) -> str:
        """``stalls: 1 (12s at step 150)``, ``stalls: 3 (longest 60s at step 300)``; ``""``."""
        top = self.longest()
        if top is None:
            return ""
        n = len(self.stalls)
        longest = "" if n == 1 else "longest "
        return f"stalls: {n} ({longest}{duration(top.seconds)} at step {top.step:,})"


def stall_event(run: str, stall: Stall) -> p.Event:
    """The warning a replay logs for ``stall``: at its step, dated when the live monitor would
    have said it (``t + limit``)."""
    return p.Event(
        run,
        0,
        stall.step,
        stall.t + stall.limit,
        level="warning",
        code=STALL_CODE,
        message=stall.words(),
        attrs={
            "seconds": stall.seconds,
            "limit": stall.limit,
            "resumed": stall.resumed,
            "derived": "recorded step times",
        },
    )
