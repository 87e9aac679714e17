"""A fake agent on a timeline: per-step rows in ``columns`` batches and heartbeats, as an agent's
publisher thread sends them, applied to a store at the monitor's (simulated) clock."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from stiffmon import protocol as p
from stiffmon.store import Store

SKEW = 1_700_000_000.0 - 37.5  # the agent's clock (unix time) minus the monitor's (monotonic)
TICK = 0.1  # the publisher's pace: one columns batch per tick while steps come


class FakeAgent:
    """One run's agent: steps at given monitor times, a batch per tick, a heartbeat per second.

    Attributes:
        store: Where its messages go.
        run: Its run id.
        now: The monitor's clock (seconds); the agent's is ``now + SKEW``.
        top: The highest step published (-1: none yet).
        measuring: The measurement its heartbeats say the loop is in ("": none).
    """

    def __init__(self, store: Store, run: str = "r", *, heartbeats: bool = True) -> None:
        self.store, self.run, self.heartbeats = store, run, heartbeats
        self.now = 0.0
        self.top = -1
        self.seq = 0
        self.next_heartbeat = 1.0
        self.measuring = ""
        self.due: list[float] = []  # monitor times of the steps to come, in order
        self.send(p.Hello, 0, name=f"live {run}", optimizer={"lr": 0.1})

    def send(self, cls: type[p.Message], step: int, **fields: object) -> None:
        self.seq += 1
        msg = cls(run=self.run, seq=self.seq, step=step, t=self.now + SKEW, **fields)  # type: ignore[arg-type]
        self.store.apply(msg, now=self.now)

    def steps(self, times: Iterable[float]) -> None:
        """Steps (numbered on from the last) to take at these monitor times."""
        self.due += sorted(times)

    def advance(self, until: float) -> None:
        """Run the publisher up to monitor time ``until``, one tick at a time."""
        while self.now < until - 1e-9:
            self.now = round(self.now + TICK, 6)
            rows = [t for t in self.due if t <= self.now + 1e-9]
            del self.due[: len(rows)]
            if rows:
                steps = np.arange(self.top + 1, self.top + 1 + len(rows), dtype=np.int64)
                self.top = int(steps[-1])
                self.seq += 1
                msg = p.Columns(
                    run=self.run,
                    seq=self.seq,
                    step=self.top,
                    t=self.now + SKEW,
                    names=("loss",),
                    steps=steps,
                    times=np.array(rows) + SKEW,
                    values=(np.full(len(rows), 0.5),),
                )
                self.store.apply(msg, now=self.now)
            if self.heartbeats and self.now >= self.next_heartbeat - 1e-9:
                self.next_heartbeat += 1.0
                hb = {"last_seq": self.seq, "dropped": 0, "measuring": self.measuring}
                self.send(p.Heartbeat, max(self.top, 0), **hb)
