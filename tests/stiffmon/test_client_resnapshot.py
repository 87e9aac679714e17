"""Re-snapshots of runs the client already has: history chunks vs live batches (Clone pattern).

The agent's history keeps per-step ``columns`` batches compacted into chunks. They used to carry
the ``seq`` of their *first* batch: a second snapshot (a new run appeared, or a gap) dropped such
a chunk as a duplicate by ``seq``, then took the end marker's ``seq``, so the live batches between
what the client had and the snapshot's cut were dropped as duplicates too: a hole. A chunk now
carries its last batch's ``seq`` and every batch's ``seq`` and end row; the client keeps the
batches it does not have.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from stiffmon import protocol as p
from stiffmon.client import Client
from stiffmon.transport import (
    SNAPSHOT_DONE,
    SNAPSHOT_END,
    SNAPSHOT_MESSAGE,
    SNAPSHOT_REQUEST,
    encode_control,
    free_port_pair,
)

Ctx = zmq.Context[zmq.Socket[bytes]]


def _cols(run: str, seq: int, steps: range) -> p.Columns:
    s = np.arange(steps.start, steps.stop)
    return p.Columns.from_columns({"loss": s * 0.5}, s, s * 1.0, run=run, seq=seq)


def _chunk(run: str, seqs: list[int], steps: range, per_batch: int = 10) -> p.Columns:
    """Batches ``seqs`` of ``per_batch`` steps each, joined as the agent's history does."""
    s = np.arange(steps.start, steps.stop)
    ends = [per_batch * (i + 1) for i in range(len(seqs))]
    assert ends[-1] == len(s)
    return p.Columns.from_columns(
        {"loss": s * 0.5}, s, s * 1.0, run=run, seq=seqs[-1], batch_seqs=seqs, batch_ends=ends
    )


class FakeAgent:
    """A PUB and a ROUTER on loopback that the test drives message by message."""

    def __init__(self, ctx: Ctx) -> None:
        port = free_port_pair()
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.pub = ctx.socket(zmq.PUB)
        self.pub.bind(f"tcp://127.0.0.1:{port}")
        self.router = ctx.socket(zmq.ROUTER)
        self.router.bind(f"tcp://127.0.0.1:{port + 1}")
        self.router.setsockopt(zmq.RCVTIMEO, 10_000)

    def publish(self, msg: p.AnyMessage) -> None:
        self.pub.send_multipart(p.encode(msg))

    def answer(
        self,
        client: Client,
        got: list[p.AnyMessage],
        history: list[p.AnyMessage],
        ends: dict[str, int],
    ) -> None:
        """Wait for the client's request (polling it), then answer it with ``history``."""
        deadline = time.monotonic() + 10
        while not self.router.poll(0):
            assert time.monotonic() < deadline, "no snapshot request"
            got += [m for m, _ in client.poll(0.05)]
        ident, tag, *_ = self.router.recv_multipart()
        assert tag == SNAPSHOT_REQUEST
        self.send_answer(ident, history, ends)

    def send_answer(self, ident: bytes, history: list[p.AnyMessage], ends: dict[str, int]) -> None:
        """Send the requester ``ident`` ``history``, the runs' end markers and the done marker."""
        for msg in history:
            self.router.send_multipart([ident, SNAPSHOT_MESSAGE, *p.encode(msg)])
        for run, seq in ends.items():
            self.router.send_multipart(
                [ident, *encode_control(SNAPSHOT_END, {"run": run, "seq": seq})]
            )
        self.router.send_multipart([ident, *encode_control(SNAPSHOT_DONE, {"runs": len(ends)})])


@pytest.fixture
def agent() -> Iterator[FakeAgent]:
    ctx: Ctx = zmq.Context()
    yield FakeAgent(ctx)
    ctx.destroy(linger=0)


def _drain(client: Client, got: list[p.AnyMessage], seconds: float = 0.5) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got += [m for m, _ in client.poll(0.05)]


def _steps(got: list[p.AnyMessage], run: str) -> list[int]:
    return [
        m.step
        for m in p.expand_columns(got)
        if m.run == run and isinstance(m, p.Scalars) and "loss" in m.names
    ]


def _live(agent: FakeAgent, client: Client, got: list[p.AnyMessage], msg: p.AnyMessage) -> None:
    """Publish ``msg`` until the client has it (the SUB may still be connecting)."""
    deadline = time.monotonic() + 10
    while client.stats.received == 0 and time.monotonic() < deadline:
        agent.publish(msg)
        got += [m for m, _ in client.poll(0.05)]


def _join_then_live(agent: FakeAgent, client: Client, got: list[p.AnyMessage]) -> None:
    """Run "a": batch 0 from the join's snapshot, batch 1 live."""
    agent.answer(client, got, [_cols("a", 0, range(10))], {"a": 0})
    _drain(client, got, 0.2)
    _live(agent, client, got, _cols("a", 1, range(10, 20)))
    _drain(client, got, 0.2)


@pytest.mark.parametrize("last", ["end", "scalars"])
def test_a_second_snapshot_of_a_live_run_leaves_no_hole(agent: FakeAgent, last: str) -> None:
    """The cut is beyond what the client has: via the end marker or a later message."""
    client = Client([agent.endpoint], snapshot_timeout=5.0)
    got: list[p.AnyMessage] = []
    try:
        _join_then_live(agent, client, got)
        assert _steps(got, "a") == list(range(20))
        agent.publish(p.Bye(run="b", seq=0, step=0, t=1.0, reason="x"))  # a new run: re-snapshot
        # the agent published batches 2 and 3 before the cut; the client gets them only after
        history: list[p.AnyMessage] = [_chunk("a", [0, 1, 2, 3], range(40))]
        if last == "scalars":  # a later message of another kind moves the run's seq on
            history.append(p.Scalars.from_dict({"x": 1.0}, run="a", seq=4, step=39, t=1.0))
        agent.answer(client, got, history, {"a": 4 if last == "scalars" else 3, "b": 0})
        _drain(client, got, 0.3)
        agent.publish(_cols("a", 2, range(20, 30)))
        agent.publish(_cols("a", 3, range(30, 40)))
        nxt = 5 if last == "scalars" else 4
        agent.publish(_cols("a", nxt, range(40, 50)))
        _drain(client, got)
    finally:
        client.close()
    assert _steps(got, "a") == list(range(50))
    seqs = [m.seq for m in got if m.run == "a"]
    assert seqs == sorted(set(seqs))  # each seq once, in order


def test_a_gap_is_filled_from_the_chunk_that_starts_before_it(agent: FakeAgent) -> None:
    client = Client([agent.endpoint], snapshot_timeout=5.0)
    got: list[p.AnyMessage] = []
    try:
        _join_then_live(agent, client, got)
        agent.publish(_cols("a", 3, range(30, 40)))  # batch 2 was lost: a gap
        agent.answer(client, got, [_chunk("a", [0, 1, 2, 3], range(40))], {"a": 3})
        agent.publish(_cols("a", 4, range(40, 50)))
        _drain(client, got)
    finally:
        client.close()
    assert client.stats.gaps == 1
    assert _steps(got, "a") == list(range(50))
    seqs = [m.seq for m in got if m.run == "a"]
    assert seqs == sorted(set(seqs))


def _values(got: list[p.AnyMessage], name: str) -> list[tuple[int, float]]:
    return [
        (m.step, m.as_dict()[name])
        for m in p.expand_columns(got)
        if isinstance(m, p.Scalars) and name in m.names
    ]


def test_a_snapshot_out_of_seq_order_fills_a_gap_exactly(agent: FakeAgent) -> None:
    """The history serves chunks by first seq: the per-step chunk (batches 0, 1, 2, 4) comes
    before the logged value of seq 3 that lies inside its range. A client that moved its
    position to the chunk's seq would drop that value as had; judged against what it had
    before the snapshot (seq 1), both come once."""
    client = Client([agent.endpoint], snapshot_timeout=5.0)
    got: list[p.AnyMessage] = []
    logged = p.Columns.from_columns(
        {"custom/val": [0.25]}, [29], [1.0], run="a", seq=3, sparse=True
    )
    try:
        _join_then_live(agent, client, got)
        agent.publish(_cols("a", 5, range(40, 50)))  # 2, 3 and 4 were lost: a gap
        chunk = p.Columns.from_columns(
            {"loss": np.arange(40) * 0.5},
            np.arange(40),
            np.arange(40) * 1.0,
            run="a",
            seq=4,
            batch_seqs=[0, 1, 2, 4],
            batch_ends=[10, 20, 30, 40],
        )
        agent.answer(client, got, [chunk, logged], {"a": 4})
        agent.publish(_cols("a", 6, range(50, 60)))
        _drain(client, got)
    finally:
        client.close()
    assert client.stats.gaps == 1
    assert _steps(got, "a") == list(range(60))
    assert _values(got, "custom/val") == [(29, 0.25)]


def test_an_answer_without_the_runs_end_marker_leaves_it_live(agent: FakeAgent) -> None:
    """A peer that stops short of a run's end marker: what it sent counts, the run goes on."""
    client = Client([agent.endpoint], snapshot_timeout=5.0)
    got: list[p.AnyMessage] = []
    try:
        _join_then_live(agent, client, got)
        agent.publish(p.Bye(run="b", seq=0, step=0, t=1.0, reason="x"))  # a new run: re-snapshot
        agent.answer(client, got, [_chunk("a", [0, 1, 2], range(30))], {"b": 0})  # no "a" end
        _drain(client, got, 0.3)
        for seq, first in ((2, 20), (3, 30), (4, 40)):
            agent.publish(_cols("a", seq, range(first, first + 10)))
        _drain(client, got)
    finally:
        client.close()
    assert _steps(got, "a") == list(range(50))


def _answer_all(agent: FakeAgent, history: list[p.AnyMessage], ends: dict[str, int]) -> None:
    """Answer every request waiting on the agent's router with ``history``."""
    while agent.router.poll(0):
        ident, tag, *_ = agent.router.recv_multipart()
        if tag == SNAPSHOT_REQUEST:
            agent.send_answer(ident, history, ends)


def test_a_late_answer_to_a_request_given_up_on_moves_no_run_back(agent: FakeAgent) -> None:
    """The client gives up on a snapshot (a busy relay or agent), the run goes on live, then the
    old answer comes: its end marker must not move the run back to where it was when asked
    (every step after it was delivered a second time, out of order, on a loaded CI machine)."""
    client = Client([agent.endpoint], snapshot_timeout=0.3)
    got: list[p.AnyMessage] = []
    try:
        _join_then_live(agent, client, got)  # run "a": seq 0 from the join, seq 1 live
        agent.publish(p.Bye(run="b", seq=0, step=0, t=1.0, reason="x"))  # new run: a snapshot
        deadline = time.monotonic() + 10
        while not agent.router.poll(0):
            assert time.monotonic() < deadline, "no snapshot request"
            got += [m for m, _ in client.poll(0.05)]
        stale, tag, *_ = agent.router.recv_multipart()  # held past the client's timeout
        assert tag == SNAPSHOT_REQUEST
        for seq in (2, 3, 4):
            agent.publish(_cols("a", seq, range(10 * seq, 10 * seq + 10)))
        _drain(client, got, 0.8)
        assert client.stats.snapshot_timeouts >= 1
        agent.publish(_cols("a", 6, range(60, 70)))  # seq 5 lost: a gap, "a" waits for a snapshot
        _drain(client, got, 0.1)
        agent.send_answer(stale, [_chunk("a", [0, 1], range(20))], {"a": 1, "b": 0})
        bye = p.Bye(run="b", seq=0, step=0, t=1.0, reason="x")
        whole = [_chunk("a", list(range(7)), range(70)), bye]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(_steps(got, "a")) < 70:
            _answer_all(agent, whole, {"a": 6, "b": 0})
            got += [m for m, _ in client.poll(0.05)]
        _drain(client, got, 0.3)
    finally:
        client.close()
    assert _steps(got, "a") == list(range(70))


def test_an_answer_waiting_unread_past_the_timeout_is_not_late(agent: FakeAgent) -> None:
    """The monitor's process is descheduled past the timeout while the answer sits in its socket:
    it reads that answer instead of asking again."""
    client = Client([agent.endpoint], snapshot_timeout=0.3)
    got: list[p.AnyMessage] = []
    try:
        agent.answer(client, got, [_cols("a", 0, range(10))], {"a": 0})
        time.sleep(0.2)  # the answer arrives in the socket
        time.sleep(0.5)  # ... and waits there past the timeout
        _drain(client, got, 0.8)
    finally:
        client.close()
    assert client.stats.snapshot_timeouts == 0 and not agent.router.poll(0)
    assert _steps(got, "a") == list(range(10))
