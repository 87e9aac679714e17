"""The snapshot server's limits, on a real ROUTER over loopback: repeat requests from one peer."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest
import zmq

from stiffmon.transport import SNAPSHOT_DONE, SNAPSHOT_REQUEST, encode_control
from stiffmon_agent.snapshots import SnapshotServer

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

    def cut() -> tuple[list[list[bytes]], int]:
        cuts.append(time.monotonic())
        return history, 49

    server = SnapshotServer(router, "run", cut, min_interval=0.5)
    t0 = time.monotonic()
    while (last := time.monotonic()) - t0 < 1.2:
        dealer.send_multipart(encode_control(SNAPSHOT_REQUEST, {"v": 1}))
        _serve_for(server, 0.005)
    _serve_for(server, 0.7)  # the last waiting request starts and is sent
    assert 3 <= len(cuts) <= 4, cuts
    assert all(b - a >= 0.5 - 1e-3 for a, b in itertools.pairwise(cuts))
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
    server = SnapshotServer(router, "run", lambda: ([[b"x"]], 0), min_interval=10.0)
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
