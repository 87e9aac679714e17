"""A subscription flood on ``stiffmon relay``'s XPUB: bounded in the relay, unseen by its agents,
and monitors watching through the relay get the run's messages again."""

from __future__ import annotations

import random
import threading
import time

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
    parse_endpoint,
)
from tests.conftest import Procs
from tests.hostile import PeakRss

MB = 1 << 20
Ctx = zmq.Context[zmq.Socket[bytes]]


class FakeAgent:
    """An agent's two sockets in a thread: a scalars message every 20 ms, every snapshot request
    answered with the whole history, and every subscription it is sent recorded."""

    def __init__(self, ctx: Ctx) -> None:
        port = free_port_pair()
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.pub = ctx.socket(zmq.XPUB)
        self.router = ctx.socket(zmq.ROUTER)
        for s, at in ((self.pub, self.endpoint), (self.router, f"tcp://127.0.0.1:{port + 1}")):
            s.setsockopt(zmq.LINGER, 0)
            s.bind(at)
        self.history: list[list[bytes]] = []
        self.topics: set[bytes] = set()  # every topic subscribed to, ever
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            seq = len(self.history)
            msg = p.Scalars.from_dict({"loss": 1.0}, run="r", seq=seq, step=seq, t=time.time())
            self.history.append(p.encode(msg))
            self.pub.send_multipart(self.history[-1])
            while self.pub.poll(0):
                frame = self.pub.recv()
                if frame[:1] == b"\x01":
                    self.topics.add(frame[1:])
            while self.router.poll(0):
                ident, tag, *_ = self.router.recv_multipart()
                if tag != SNAPSHOT_REQUEST:
                    continue
                for frames in list(self.history):
                    self.router.send_multipart([ident, SNAPSHOT_MESSAGE, *frames])
                end = encode_control(SNAPSHOT_END, {"run": "r", "seq": len(self.history) - 1})
                self.router.send_multipart([ident, *end])
                self.router.send_multipart([ident, *encode_control(SNAPSHOT_DONE, {})])
            time.sleep(0.02)

    def close(self) -> None:
        self.stop.set()
        self._thread.join(5)
        self.pub.close(0)
        self.router.close(0)


def _watch(client: Client, got: list[p.AnyMessage], more: int, timeout: float = 20.0) -> None:
    """Poll until ``more`` messages more than ``got`` holds arrived (or the timeout)."""
    want = len(got) + more
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(got) < want:
        got += [m for m, _ in client.poll(0.1)]


def _flood(ctx: Ctx, at: str, rnd: random.Random, n: int, low: int, high: int) -> None:
    """Subscribe to ``n`` distinct random topics of ``low``–``high`` bytes at ``at``."""
    peer = ctx.socket(zmq.XSUB)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(at)
    time.sleep(0.3)
    for _ in range(n):
        peer.send(b"\x01" + rnd.randbytes(rnd.randint(low, high)))
    time.sleep(1.5)
    peer.close()


def test_a_subscription_flood_on_the_relay_is_bounded_and_monitors_come_back(
    procs: Procs,
) -> None:
    """20,000 distinct long topics, then 10,000 short ones, from a raw socket on the relay's
    XPUB: the relay process grows by a few MB, its agent never sees a topic but the empty one,
    and a monitor connected through the relay all along gets the run's messages afterwards,
    every step once."""
    ctx: Ctx = zmq.Context()
    agent = FakeAgent(ctx)
    bind = parse_endpoint(f"tcp://127.0.0.1:{free_port_pair()}")
    relay = procs.start("-m", "stiffmon", "relay", agent.endpoint, "--bind", str(bind))
    watcher = Client([str(bind)], snapshot_timeout=1.0)
    got: list[p.AnyMessage] = []
    try:
        _watch(watcher, got, 10)
        assert len(got) >= 10, "nothing through the relay"
        time.sleep(1.0)  # past the first messages' one-off allocations
        got += [m for m, _ in watcher.poll(0.1)]
        rnd = random.Random(0)
        with PeakRss(relay.pid) as long_topics:
            _flood(ctx, bind.pub, rnd, 20_000, 128, 1000)
        with PeakRss(relay.pid) as short_topics:
            _flood(ctx, bind.pub, rnd, 10_000, 1, 127)
        _watch(watcher, got, 20)
        time.sleep(1.0)
        got += [m for m, _ in watcher.poll(0.5)]
    finally:
        watcher.close()
        agent.close()
        ctx.destroy(linger=0)
    assert relay.poll() is None, "the relay died"
    relay.terminate()
    _, said = relay.communicate(timeout=10)
    print(
        f"relay, distinct subscriptions on XPUB: +{long_topics.growth / MB:.1f} MB (long), "
        f"+{short_topics.growth / MB:.1f} MB (short); agent saw {len(agent.topics)} topics"
    )
    assert long_topics.growth <= 16 * MB, f"RSS grew by {long_topics.growth / MB:.0f} MB"
    assert short_topics.growth <= 32 * MB, f"RSS grew by {short_topics.growth / MB:.0f} MB"
    assert agent.topics == {b""}, f"the agent was sent {len(agent.topics)} topics"
    assert "flooded" in said  # the relay says why its monitors were dropped
    steps = [m.step for m in p.expand_columns(got) if m.kind == "scalars"]
    assert len(steps) >= 30 and steps == list(range(steps[0], steps[0] + len(steps)))


def test_an_oversized_frame_from_an_agent_does_not_silence_it_behind_a_relay() -> None:
    """An upstream agent sends the relay's XSUB one frame over its limit: libzmq drops that
    connection for good; the relay connects again and the monitor gets the run's messages."""
    from stiffmon.relay import Relay
    from stiffmon.transport import MAX_DATA_FRAME_BYTES
    from tests.stiffmon.test_client_reconnect import HistoryAgent, settle

    ctx: Ctx = zmq.Context()
    agent = HistoryAgent(ctx)
    bind = f"tcp://127.0.0.1:{free_port_pair()}"
    warnings: list[str] = []
    got: list[p.AnyMessage] = []
    try:
        with Relay([agent.endpoint], bind, warn=warnings.append).start(), Client([bind]) as client:
            got += settle(agent, client)
            assert got, "nothing through the relay"
            agent.pub.send_multipart([b"r/scalars", b"\x00" * (MAX_DATA_FRAME_BYTES + 1)])
            after = agent.publish()
            t0 = time.monotonic()
            # ~1 s on a quiet machine; the re-sync resends the agent's whole (growing) history,
            # seconds on a loaded one: silenced for good is what this tells
            while time.monotonic() - t0 < 30 and max(m.step for m in got) < after + 10:
                agent.publish()
                agent.answer()
                got += [m for m, _ in client.poll(0.05)]
            latency = time.monotonic() - t0
    finally:
        ctx.destroy(linger=0)
    print(f"oversized frame to the relay's XSUB: messages again after {latency:.2f} s")
    assert max(m.step for m in got) >= after + 10, "the agent stayed silent behind the relay"
    assert any("oversized" in w and agent.endpoint in w for w in warnings), warnings
