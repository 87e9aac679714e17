"""A frame over the monitor's size limit: libzmq drops that connection and never reconnects it (a
protocol error, unlike a lost connection); the client connects again, says so, and re-syncs."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import zmq

from stiffmon import protocol as p
from stiffmon.client import Client
from stiffmon.transport import (
    MAX_DATA_FRAME_BYTES,
    SNAPSHOT_DONE,
    SNAPSHOT_END,
    SNAPSHOT_MESSAGE,
    SNAPSHOT_REQUEST,
    encode_control,
    free_port_pair,
)
from tests.hostile import GIB, _greet

Ctx = zmq.Context[zmq.Socket[bytes]]


class HistoryAgent:
    """A raw PUB and a ROUTER that answers every snapshot request with all it published."""

    def __init__(self, ctx: Ctx) -> None:
        port = free_port_pair()
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(self.endpoint)
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(f"tcp://127.0.0.1:{port + 1}")
        self.history: list[list[bytes]] = []
        self.requests = 0
        self.oversized_answers = 0  # the first requests get one oversized frame as their answer

    def publish(self) -> int:
        seq = len(self.history)
        frames = p.encode(p.Scalars.from_dict({"loss": 1.0}, run="r", seq=seq, step=seq, t=1.0))
        self.history.append(frames)
        self.pub.send_multipart(frames)
        return seq

    def answer(self) -> None:
        while self.router.poll(0):
            ident, tag, *_ = self.router.recv_multipart()
            if tag != SNAPSHOT_REQUEST:
                continue
            self.requests += 1
            if self.requests <= self.oversized_answers:
                self.router.send_multipart([ident, b"\x00" * (MAX_DATA_FRAME_BYTES + 1)])
                continue
            for frames in self.history:
                self.router.send_multipart([ident, SNAPSHOT_MESSAGE, *frames])
            end = {"run": "r", "seq": len(self.history) - 1}
            self.router.send_multipart([ident, *encode_control(SNAPSHOT_END, end)])
            self.router.send_multipart([ident, *encode_control(SNAPSHOT_DONE, {})])


def settle(agent: HistoryAgent, client: Client) -> list[p.AnyMessage]:
    """Publish and answer for 1.5 s (up to 10 s until a first message): the first snapshots
    answered and messages live; what the client got meanwhile."""
    got: list[p.AnyMessage] = []
    start = time.monotonic()
    while time.monotonic() - start < 1.5 or (not got and time.monotonic() - start < 10):
        agent.publish()
        agent.answer()
        got += [m for m, _ in client.poll(0.05)]
    return got


def _steps(got: list[p.AnyMessage]) -> list[int]:
    return [m.step for m in p.expand_columns(got) if m.kind == "scalars"]


def test_an_oversized_frame_does_not_silence_an_address(ctx: Ctx) -> None:
    """One frame over ``ZMQ_MAXMSGSIZE`` from a publisher: the client gets that publisher's later
    messages within seconds, and through a snapshot the ones sent while it was away: every step
    once, in order; and the drop is reported."""
    agent = HistoryAgent(ctx)
    with Client([agent.endpoint], snapshot_timeout=0.5) as client:
        got = settle(agent, client)
        assert got, "no message before the oversized frame"
        agent.pub.send_multipart([b"r/scalars", b"\x00" * (MAX_DATA_FRAME_BYTES + 1)])
        t0 = time.monotonic()
        after = agent.publish()  # sent after the oversized frame: on the dropped connection
        latency = None
        while time.monotonic() - t0 < 15 and (latency is None or time.monotonic() - t0 < 3):
            agent.publish()
            agent.answer()
            got += [m for m, _ in client.poll(0.05)]
            if latency is None and _steps(got) and max(_steps(got)) >= after:
                latency = time.monotonic() - t0
        assert latency is not None and latency < 10.0, "the address stayed silent"
        for _ in range(20):  # what is still on its way
            agent.answer()
            got += [m for m, _ in client.poll(0.05)]
        warnings = client.take_warnings()
        stats = client.stats
    print(f"oversized frame: messages again after {latency:.2f} s")
    steps = _steps(got)
    assert steps == list(range(len(agent.history)))  # none lost, none twice, up to the last
    assert stats.reconnects >= 1 and agent.requests >= 2  # re-synced by a snapshot
    assert any("oversized" in w and agent.endpoint in w for w in warnings), warnings
    assert client.take_warnings() == []  # each handed out once


def test_an_oversized_snapshot_frame_does_not_silence_the_snapshot_service(ctx: Ctx) -> None:
    """The snapshot service answers the first request with an oversized frame: libzmq drops the
    client's snapshot connection for good; the client makes a new one and gets the history."""
    agent = HistoryAgent(ctx)
    agent.oversized_answers = 1
    got: list[p.AnyMessage] = []
    with Client([agent.endpoint], snapshot_timeout=0.5) as client:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10 and (agent.requests < 2 or len(_steps(got)) < 20):
            agent.publish()
            agent.answer()
            got += [m for m, _ in client.poll(0.05)]
        elapsed = time.monotonic() - t0
        assert agent.requests >= 2 and _steps(got), "no snapshot after the oversized answer"
        warnings = client.take_warnings()
    print(f"oversized snapshot frame: history after {elapsed:.2f} s")
    assert _steps(got) == list(range(len(_steps(got))))  # from the first step, none lost
    assert any("snapshot connection" in w for w in warnings), warnings


class OversizedPub:
    """Accept every connection as a PUB and announce a 1 GiB frame on it; count connections."""

    def __init__(self, port: int) -> None:
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", port))
        self.server.listen(16)
        self.server.settimeout(0.2)
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            self.connections += 1
            with conn, contextlib.suppress(OSError):
                _greet(conn, "PUB", as_server=True)
                conn.sendall(b"\x02" + GIB.to_bytes(8, "big"))  # refused from its length
                conn.settimeout(2)
                while conn.recv(4096):  # until the client hangs up
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.server.close()


def test_a_peer_that_always_sends_oversized_frames_costs_a_connection_per_wait() -> None:
    """Every connection gets an oversized frame: the client connects again after 0.5, 1, 2 … s
    (doubling), never in a busy loop, and keeps a bounded list of warnings."""
    port = free_port_pair()
    hostile = OversizedPub(port)
    try:
        with Client([f"tcp://127.0.0.1:{port}"], snapshot_timeout=0.5) as client:
            cpu0, t0 = time.process_time(), time.monotonic()
            while time.monotonic() - t0 < 5.0:
                client.poll(0.1)
            cpu = time.process_time() - cpu0
            stats = client.stats
    finally:
        hostile.close()
    assert 2 <= hostile.connections <= 6  # 0 s, then 0.5, 1.5, 3.5 s (+ the grace each time)
    print(
        f"oversized frame on every connection, 5 s: {hostile.connections} connections, "
        f"{cpu:.2f} s CPU"
    )
    assert len(stats.warnings) <= 20
    assert cpu < 2.0
