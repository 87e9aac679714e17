"""The snapshot server on a real ROUTER over loopback: repeat requests from one peer, and the
order each peer asks for."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator

import pytest
import zmq

from stiffmon import protocol as p
from stiffmon.relay import Relay
from stiffmon.transport import (
    SNAPSHOT_DONE,
    SNAPSHOT_MESSAGE,
    SNAPSHOT_REQUEST,
    encode_control,
    parse_endpoint,
    snapshot_request,
)
from stiffmon_agent.columns import RawColumns
from stiffmon_agent.outgoing import Outgoing
from stiffmon_agent.publisher import Publisher
from stiffmon_agent.snapshots import SnapshotServer
from tests.conftest import free_port_pair

Ctx = zmq.Context[zmq.Socket[bytes]]


@pytest.fixture
def sockets() -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    ctx: Ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    SnapshotServer.configure(router)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 2000)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    yield router, dealer
    dealer.close(0)
    router.close(0)
    ctx.term()


def _serve_for(server: SnapshotServer, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        server.read_requests()
        server.pump()
        time.sleep(0.002)


def test_a_peer_asking_fast_gets_a_snapshot_per_interval_and_its_last_request_answered(
    sockets: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    """200 requests a second for 1.2 s from one peer that reads: 4 snapshots are cut (at 0,
    0.5, 1.0 s and, for the requests after that, 1.5 s), not 240."""
    router, dealer = sockets
    cuts: list[float] = []
    history = [[b"m%d" % i] for i in range(50)]

    def cut(first_seq: bool) -> tuple[list[list[bytes]], int]:
        cuts.append(time.monotonic())
        return history, 49

    server = SnapshotServer(router, "run", cut, min_interval=0.5)
    t0 = time.monotonic()
    while (last := time.monotonic()) - t0 < 1.2:
        dealer.send_multipart(encode_control(SNAPSHOT_REQUEST, {"v": 1}))
        _serve_for(server, 0.005)
    _serve_for(server, 0.7)  # the last waiting request starts and is sent
    assert 3 <= len(cuts) <= 4, cuts
    # the server holds 0.5 s between its own clock readings; the callback reads the clock a
    # little later, by as much as a busy machine delays it
    assert all(b - a >= 0.5 - 0.05 for a, b in itertools.pairwise(cuts)), cuts
    assert server.stats.deferred >= 1 and server.stats.coalesced > 100
    done = 0
    while dealer.poll(200):
        frames = dealer.recv_multipart()
        done += frames[0] == SNAPSHOT_DONE
    assert done == len(cuts) == server.stats.served
    assert cuts[-1] >= last  # the requests after the last start were answered, not dropped


def test_other_peers_are_not_held_back_by_one_peers_interval(
    sockets: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    router, dealer = sockets
    server = SnapshotServer(router, "run", lambda first_seq: ([[b"x"]], 0), min_interval=10.0)
    other = router.context.socket(zmq.DEALER)
    other.setsockopt(zmq.LINGER, 0)
    other.connect(router.getsockopt_string(zmq.LAST_ENDPOINT))
    try:
        dealer.send_multipart(encode_control(SNAPSHOT_REQUEST, {"v": 1}))
        _serve_for(server, 0.3)
        dealer.send_multipart(encode_control(SNAPSHOT_REQUEST, {"v": 1}))  # waits 10 s
        other.send_multipart(encode_control(SNAPSHOT_REQUEST, {"v": 1}))
        _serve_for(server, 0.3)
        assert server.stats.served == 2 and server.stats.deferred == 1
    finally:
        other.close(0)


def _snapshot(ep: str, request: list[bytes]) -> list[p.AnyMessage]:
    """The messages of one snapshot from ``ep`` (an agent or a relay) for ``request``."""
    ctx: Ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.setsockopt(zmq.RCVTIMEO, 10_000)
    d.connect(parse_endpoint(ep).snapshot)
    got: list[p.AnyMessage] = []
    try:
        d.send_multipart(request)
        while (frames := d.recv_multipart())[0] != SNAPSHOT_DONE:
            if frames[0] == SNAPSHOT_MESSAGE:
                got.append(p.decode(frames[1:]))
    finally:
        d.close(0)
        ctx.term()
    return got


@pytest.mark.parametrize("via_relay", [False, True])
def test_each_peer_gets_the_order_it_asks_for(via_relay: bool) -> None:
    """A monitor of today takes chunks in first-seq order (few messages); one of before the
    sparse chunks (no ``"order"`` in its request) gets strictly increasing seqs. A relay asks
    its upstreams for the order that every requester it answers takes."""
    pub = Publisher("r", endpoint=f"tcp://127.0.0.1:{free_port_pair()}", heartbeat_interval=3600)
    pub.start()
    try:
        for i in range(40):
            rows = list(range(10 * i, 10 * i + 10))
            raw = RawColumns(("loss",), [(s, time.time(), (float(s),)) for s in rows])
            pub.submit(Outgoing(p.Columns, rows[-1], time.time(), {"raw": raw}))
            fields = {"values_names": ["coverage/gram/done"], "values_raw": [float(i)]}
            pub.submit(Outgoing(p.Scalars, rows[-1], time.time(), fields))
        while pub.seq < 79:
            time.sleep(0.05)
        assert pub.endpoint is not None
        ep = str(pub.endpoint)
        with contextlib.ExitStack() as stack:
            if via_relay:
                ep = f"tcp://127.0.0.1:{free_port_pair()}"
                stack.enter_context(Relay([str(pub.endpoint)], ep, snapshot_timeout=5).start())
                time.sleep(0.3)
            new = _snapshot(ep, snapshot_request())
            old = _snapshot(ep, encode_control(SNAPSHOT_REQUEST, {"v": 2}))
    finally:
        pub.close()
    assert len(new) == 2  # the per-step chunk and the coverage column
    assert len(old) == 80 and [m.seq for m in old] == list(range(80))
    for got in (new, old):
        rows = p.expand_columns(got)
        assert [m.step for m in rows if "loss" in m.names] == list(range(400))  # type: ignore[attr-defined]
        cov = [m for m in rows if "coverage/gram/done" in m.names]  # type: ignore[attr-defined]
        assert [m.step for m in cov] == list(range(9, 400, 10))
