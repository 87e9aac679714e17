"""A run's state in words, and how a hung training loop is told from a gone agent.

A live run is stalled when no message came for :data:`STALL_SECONDS` (the agent is gone or cut
off), or when the agent still talks (heartbeats) but no new step came for longer than
``max(STEP_STALL_FLOOR, STEP_STALL_FACTOR × the recent seconds per step)`` (the training loop
hangs: a dataloader or NCCL deadlock). The latter is judged on the agent's clock
(:class:`Progress`), so clock skew between the machines does not matter. A heavy measurement
is no hang: while the agent's heartbeats say it is in one (``measuring``) the run is not
stalled, and the measurement's results (made in the training loop, after its step) restart the
clock (:meth:`Progress.alive`), live and in a replay alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

STALL_SECONDS = 3.0
LOST_SECONDS = 60.0  # stalled this long without a bye: the process is probably gone
FOLLOW_QUIET_SECONDS = 10.0  # a followed file that has not grown this long is stalled
STEP_STALL_FLOOR = 10.0  # seconds without a new step (agent alive) before a run is stalled ...
STEP_STALL_FACTOR = 5.0  # ... or this many typical step intervals, whichever is longer
STEP_INTERVALS = 16  # recent seconds-per-step estimates the typical interval is the median of


def duration(seconds: float) -> str:
    """12s, 3m, 2h."""
    if seconds < 100:
        return f"{seconds:.0f}s"
    if seconds < 6000:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


@dataclass(frozen=True)
class Health:
    """A run's state in words.

    Attributes:
        state: live, stalled, lost (stalled > 60 s, no bye), finished, replay or ended
            (a replay that reached its end without a bye).
        text: Short words for the state: ``live``, ``stalled 12s``,
            ``stalled 12s (no step since 149; agent alive)``, ``no bye (lost 3m)``.
        problems: What went wrong, worst first: ``diverged at step 19``,
            ``sharpness disabled: …``.
        level: ``ok``, ``warning`` or ``error``.
        why: Why a run is stalled: ``no message for 3 s`` or
            ``no step since 149 for 12s; agent alive``.
    """

    state: str
    text: str
    problems: tuple[str, ...] = ()
    level: str = "ok"
    why: str = ""


@dataclass
class Progress:
    """How far the training loop has got, on the agent's clock (tells a hung loop from a gone one).

    Attributes:
        step: The highest step seen (-1: none yet; a hello does not count).
        t: Agent time at which ``step`` was reached (its row's time).
        agent_t: The latest agent time any message carried.
        seen: Monitor time (monotonic) at which ``agent_t`` arrived.
        intervals: Recent seconds-per-step estimates, oldest first.
        measuring: The measurement the latest heartbeat said the loop is in (``""``: none).
    """

    step: int = -1
    t: float = math.nan
    agent_t: float = math.nan
    seen: float = 0.0
    intervals: list[float] = field(default_factory=list)
    measuring: str = ""
    _pace: float | None = field(default=None, repr=False)  # the median, until intervals change

    def note_time(self, t: float, now: float) -> None:
        """A message made at agent time ``t`` arrived at monitor time ``now``."""
        if not t <= self.agent_t:  # NaN-safe: also the first one
            self.agent_t, self.seen = t, now

    def advance(self, step: int, t: float, first: tuple[int, float] | None = None) -> None:
        """Step ``step`` was reached at agent time ``t``.

        Args:
            step: The step.
            t: Its agent time.
            first: An earlier (step, time) of the same batch, to estimate the pace from when no
                step was seen before.
        """
        if step <= self.step:
            return
        base = (self.step, self.t) if self.step >= 0 else first
        if base is not None and step > base[0] and t >= base[1]:  # False for NaN times
            self.intervals.append((t - base[1]) / (step - base[0]))
            del self.intervals[:-STEP_INTERVALS]
            self._pace = None
        self.step, self.t = step, t

    def alive(self, step: int, t: float) -> None:
        """A measurement's message of step ``step`` was made at agent time ``t``: the loop was
        busy measuring, not hung, up to ``t`` (the time to the next step counts from there, and
        the pace leaves the measurement out)."""
        if step == self.step and t > self.t:  # False for NaN times
            self.t = t

    def since_step(self, now: float) -> float:
        """Seconds since the last new step: agent time, plus monitor time since the agent's last
        word (so neither clock is compared with the other)."""
        return self.agent_t - self.t + max(0.0, now - self.seen)

    def pace(self) -> float:
        """Seconds per step: the median of the recent :attr:`intervals` (NaN before any); kept
        until they change (a replay asks at every message: 162k medians were 5 s of a seek)."""
        if self._pace is None:
            self._pace = float(np.median(self.intervals)) if self.intervals else math.nan
        return self._pace

    def limit(self) -> float:
        """Seconds without a new step that make a run stalled (inf before the pace is known)."""
        if not self.intervals:
            return math.inf
        return max(STEP_STALL_FLOOR, STEP_STALL_FACTOR * self.pace())

    def hung(self, now: float) -> bool:
        """Whether no new step came for longer than :meth:`limit` (never while measuring)."""
        return not self.measuring and self.since_step(now) > self.limit()
