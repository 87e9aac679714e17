"""The publisher thread's pace: per-step batches every 0.25 s while a monitor subscribes, slower
while nobody does (its XPUB socket says which)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from torch import nn

from stiffmon import protocol as p
from stiffmon.client import Client
from stiffmon.session import read_session
from stiffmon_agent import Agent
from stiffmon_agent.publisher import Publisher
from tests.conftest import wait_for


@pytest.fixture
def publisher(endpoint: str) -> Iterator[Publisher]:
    pub = Publisher("pace", endpoint=endpoint)
    pub.batch_interval, pub.idle_interval = 0.02, 0.5
    pub.start()
    yield pub
    pub.close()


def test_the_pace_follows_the_subscribers(
    publisher: Publisher, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    assert publisher.endpoint is not None
    assert publisher.subscriptions == 0 and publisher.interval == 0.5  # nobody watches yet
    subs = []
    for _ in range(2):  # a second subscriber to the same topic changes nothing
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(publisher.endpoint.pub)
        subs.append(sub)
    assert wait_for(lambda: publisher.subscriptions == 1)
    assert publisher.interval == 0.02
    subs[0].close()
    time.sleep(1.2)  # two idle wakes at least: still watched by the other one
    assert publisher.subscriptions == 1
    subs[1].close()  # the last one goes: the XPUB passes its unsubscription up
    assert wait_for(lambda: publisher.subscriptions == 0)
    assert publisher.interval == 0.5


def test_frames_that_are_not_subscriptions_are_ignored(
    publisher: Publisher, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    assert publisher.endpoint is not None
    raw = ctx.socket(zmq.XSUB)  # an XSUB may send any frame upstream
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(publisher.endpoint.pub)
    for frame in (b"", b"\x02junk", b"hello", b"\x00never-subscribed", b"\x00again"):
        raw.send(frame)
    raw.send(b"\x01topic")
    assert wait_for(lambda: publisher.subscriptions == 1)
    time.sleep(0.6)
    assert publisher.subscriptions == 1  # never negative, nothing else counted
    assert publisher.alive
    raw.send(b"\x00topic")
    assert wait_for(lambda: publisher.subscriptions == 0)


def _columns(path: Path) -> list[p.Columns]:
    return [m for m in read_session(path)[0] if isinstance(m, p.Columns)]


def test_batches_are_slower_while_nobody_watches_and_every_step_is_kept(
    tmp_path: Path, endpoint: str
) -> None:
    rec = tmp_path / "pace.stiff"
    agent = Agent(
        nn.Linear(2, 2), nn.MSELoss(), None, endpoint=endpoint, record=rec, registry=False
    )
    step = 0

    def run_for(seconds: float) -> None:
        nonlocal step
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            agent.step(float(step))
            step += 1
            time.sleep(0.002)

    client = None
    try:
        run_for(2.0)
        assert agent._columns.interval == 0.5
        alone = step
        client = Client([endpoint])
        assert wait_for(lambda: bool(client.poll(0.05)) and agent._columns.interval == 0.25)
        first_watched = step
        run_for(4.0)
    finally:
        if client is not None:
            client.close()
        agent.close()
    batches = _columns(rec)
    steps = [int(s) for b in batches for s in b.steps]
    assert steps == list(range(step))  # nothing lost at either pace
    # unwatched, a batch spans up to 0.5 s (0.25 s batches would be ~8 in 2 s; a busy machine
    # only makes them fewer), watched 0.25 s (~16 in 4 s: the slowest machine sends more than 9)
    unwatched = [b for b in batches if int(b.steps[-1]) < alone]
    watched = [b for b in batches if int(b.steps[0]) >= first_watched]
    assert 1 <= len(unwatched) <= 6, [len(b) for b in unwatched]
    assert len(watched) > 9, [len(b) for b in watched]


def test_a_full_batch_is_written_at_once_not_at_the_idle_pace(tmp_path: Path) -> None:
    rec = tmp_path / "full.stiff"
    agent = Agent(
        nn.Linear(2, 2),
        nn.MSELoss(),
        None,
        endpoint="",
        record=rec,
        registry=False,
        idle_batch_interval=60.0,  # nobody watches and the thread would sleep for a minute
    )
    try:
        n = agent._columns.max_rows
        time.sleep(0.3)  # the thread is in its long wait
        for i in range(n):
            agent.step(float(i))
        assert wait_for(lambda: rec.exists() and sum(len(b) for b in _columns(rec)) == n, 20)
    finally:
        agent.close()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), ValueError("deleted")])
def test_a_write_that_fails_inside_a_warning_stops_the_recording_once(error: Exception) -> None:
    """The writer fails on the nan-loss event that a non-finite loss makes while its scalars are
    being emitted. An OSError (disk full) pauses the recording: the writer is kept for a later
    try, not closed, and the pause is said once. Anything else stops it: the emit returns no
    writer, so later messages are not written to a closed file, and that is said once."""
    from stiffmon_agent.outgoing import Outgoing

    class FailsSecond:
        def __init__(self) -> None:
            self.writes = 0
            self.closed = False

        def write_frames(self, frames: list[bytes]) -> None:
            self.writes += 1
            if self.writes >= 2:
                raise error

        def close(self) -> None:
            self.closed = True

    warned: list[str] = []
    pub = Publisher("r", endpoint="", warn=warned.append)
    writer = FailsSecond()
    item = Outgoing(p.Scalars, 3, 1.0, {"values_names": ["loss"], "values_raw": [float("nan")]})
    out = pub._emit(item, None, writer)  # type: ignore[arg-type]
    if isinstance(error, OSError):
        assert writer.writes == 2 and not writer.closed and out is writer
        assert sum("paused at step 3" in w for w in warned) == 1
        assert not any("recording stopped" in w for w in warned)
    else:
        assert writer.writes == 2 and writer.closed and out is None
        assert sum("recording stopped" in w for w in warned) == 1
