"""The agent against hostile and broken peers: floods, huge frames, bad messages (DESIGN §4)."""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest
import zmq

from stiffmon import protocol as p
from stiffmon.client import Client
from stiffmon.session import read_session
from stiffmon.transport import (
    SNAPSHOT_DONE,
    SNAPSHOT_END,
    SNAPSHOT_MESSAGE,
    SNAPSHOT_REQUEST,
    decode_control,
    encode_control,
    parse_endpoint,
)
from stiffmon_agent.outgoing import Outgoing
from stiffmon_agent.publisher import Publisher
from tests.conftest import ROOT, Procs, free_port_pair
from tests.hostile import GIB, PeakRss, attack_connect

MB = 1 << 20
ENV = {"PYTHONPATH": f"{ROOT}:{ROOT / 'agent'}"}


def _scalars(step: int) -> Outgoing:
    return Outgoing(p.Scalars, step, time.time(), {"values_names": ["loss"], "values_raw": [1.0]})


def _start_agent(
    procs: Procs, tmp_path: Path, seconds: float, go: Path | None = None
) -> tuple[subprocess.Popen[str], str]:
    endpoint = f"tcp://127.0.0.1:{free_port_pair()}"
    args = ["--endpoint", endpoint, "--record", str(tmp_path / "run.stiff")]
    args += ["--seconds", str(seconds)] + (["--go", str(go)] if go else [])
    proc = procs.start("-m", "tests.agent.hostile_agent", *args, env=ENV)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready"), (line, proc.stderr.read() if proc.stderr else "")
    return proc, endpoint


def _serves_a_monitor(endpoint: str) -> None:
    """The agent still gives a genuine monitor its run's hello."""
    client = Client([endpoint])
    try:
        deadline = time.monotonic() + 20
        got: list[p.AnyMessage] = []
        while time.monotonic() < deadline and not any(m.kind == "hello" for m in got):
            got += [m for m, _ in client.poll(0.1)]
        assert any(m.kind == "hello" for m in got)
    finally:
        client.close()


def _windows(proc: subprocess.Popen[str], into: list[tuple[float, int, float]]) -> threading.Thread:
    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            parts = line.split()
            if parts and parts[0] == "w":
                into.append((float(parts[1]), int(parts[2]), float(parts[3])))
            elif parts and parts[0] == "done":
                into.append((-1.0, int(parts[1]), float(parts[2])))

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


def _check_session(path: Path, steps: int) -> p.Heartbeat:
    msgs, scan = read_session(path)
    assert scan.state == "clean"
    losses = [
        m.step for m in p.expand_columns(msgs) if isinstance(m, p.Scalars) and "loss" in m.names
    ]
    assert losses == list(range(steps))  # every step, once, in order
    assert msgs[-1].kind == "bye" and msgs[-2].kind == "heartbeat"
    last_hb = msgs[-2]
    assert isinstance(last_hb, p.Heartbeat)
    return last_hb


# ------------------------------------------------------------------ the flood (major defect 1)


def _in(windows: list[tuple[float, int, float]], lo: float, hi: float) -> tuple[int, float]:
    """Steps and CPU seconds of the windows ending in (lo, hi]."""
    sel = [w for w in windows if lo < w[0] <= hi]
    return sum(w[1] for w in sel), sum(w[2] for w in sel)


def _flood_once(procs: Procs, tmp_path: Path) -> tuple[float, float]:
    """One flood against a run with a control run alongside; RSS, file and gross pace asserted.

    Returns the flooded run's slowdown and CPU/step ratio, both calibrated on the seconds before
    the flood.
    """
    baseline, flood_s = 4.0, 10.0
    (tmp_path / "a").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    go = tmp_path / "go"
    proc, endpoint = _start_agent(procs, tmp_path / "a", baseline + flood_s + 1.5, go)
    control, _ = _start_agent(procs, tmp_path / "b", baseline + flood_s + 1.5, go)
    go.touch()  # both start training now
    windows: list[tuple[float, int, float]] = []
    control_windows: list[tuple[float, int, float]] = []
    readers = [_windows(proc, windows), _windows(control, control_windows)]
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    flooder = ctx.socket(zmq.DEALER)
    flooder.setsockopt(zmq.LINGER, 0)
    flooder.connect(parse_endpoint(endpoint).snapshot)
    rate = float(os.environ.get("STIFFMON_FLOOD_RATE", "200"))  # 0: calibrate the comparison
    try:
        time.sleep(baseline)
        rss = PeakRss(proc.pid, interval=0.1)
        with rss:
            t0 = time.monotonic()
            sent = 0
            while (now := time.monotonic()) < t0 + flood_s:
                if sent < (now - t0) * rate:
                    flooder.send_multipart(encode_control(SNAPSHOT_REQUEST, {"v": 1}), zmq.NOBLOCK)
                    sent += 1
                else:
                    time.sleep(0.001)
            t1 = time.monotonic()
        for pr in (proc, control):
            pr.wait(60)
        for r in readers:
            r.join(10)
    finally:
        flooder.close(0)
        ctx.term()
    assert sent >= rate * flood_s * 0.95
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    done = [w for w in windows if w[0] < 0]
    assert done, windows
    steps, dropped = done[0][1], done[0][2]
    # memory: the training process grows by at most 64 MB
    assert rss.growth <= 64 * MB, f"RSS grew by {rss.growth / MB:.0f} MB"
    # pace: steps, and process CPU seconds per step (the publisher thread's work included),
    # of the flooded run against the control run over the same seconds
    a_steps, a_cpu = _in(windows, t0 + 0.5, t1)
    b_steps, b_cpu = _in(control_windows, t0 + 0.5, t1)
    a0, a0_cpu = _in(windows, t0 - baseline + 1.0, t0)
    b0, b0_cpu = _in(control_windows, t0 - baseline + 1.0, t0)
    # the two runs need not get equal shares of the cores: calibrate on the seconds before
    slowdown = 1 - (a_steps / b_steps) / (a0 / b0)
    print(
        f"flood: {sent} requests in {t1 - t0:.1f} s; RSS +{rss.growth / MB:.1f} MB; "
        f"{a_steps / (t1 - t0 - 0.5):.0f} steps/s flooded vs {b_steps / (t1 - t0 - 0.5):.0f} "
        f"alongside (before the flood {a0} vs {b0} steps: {100 * slowdown:+.1f} % slower); "
        f"CPU/step {1e6 * a_cpu / a_steps:.0f} vs {1e6 * b_cpu / b_steps:.0f} us; {steps} steps"
    )
    # Steps/s and CPU/step of two identical processes sharing two cores with a flooder differ by
    # up to ±30 % flood or not (which one shares a core with the flooder): both ratios are
    # calibrated on the seconds before the flood. The 10 % bounds are asserted where the cores
    # are not oversubscribed; anywhere, the flooded run must not be grossly slower (the old
    # publisher: 38-69 % slower).
    cpu_ratio = (a_cpu / a_steps) / (b_cpu / b_steps) / ((a0_cpu / a0) / (b0_cpu / b0))
    print(f"calibrated CPU/step ratio {cpu_ratio:.3f}")
    assert cpu_ratio <= 1.5
    # the session file: every step and the bye, nothing dropped
    hb = _check_session(tmp_path / "a" / "run.stiff", steps)
    assert dropped == 0 and hb.dropped == 0
    return slowdown, cpu_ratio


@pytest.mark.slow
def test_snapshot_request_flood_costs_training_nothing(procs: Procs, tmp_path: Path) -> None:
    """200 requests/s for 10 s from a peer that never reads: RSS, pace, file all hold.

    The pace is compared with an identical run started alongside that nobody floods, over the
    same seconds, so the machine's own load affects both alike. On a quiet 2-core machine the
    flood costs 5-7 % of the pace, and one measurement scatters by about ±5 % (which of the
    runs shares a core with the flooding test process): up to two more floods are measured
    while the last is above a 10 % bound, and the best must be within both.
    """
    # the test's own three processes fill two cores: any other busy process makes the steps/s
    # of the two runs depend on which shares a core with whom (±15 % seen at a load of 1 more),
    # so the pace bound needs a machine quiet before the test; CPU per step holds anywhere
    load = os.getloadavg()[0]
    quiet = load < 0.5 * (os.cpu_count() or 1)
    tries = []
    for attempt in range(3):
        slowdown, cpu_ratio = _flood_once(procs, tmp_path / f"try{attempt}")
        tries.append((slowdown, cpu_ratio))
        if (slowdown <= 0.10 or not quiet) and cpu_ratio <= 1.10:
            break
    assert min(t[1] for t in tries) <= 1.10, tries
    if quiet:
        assert min(t[0] for t in tries) <= 0.10, tries
    else:
        print(f"load {load:.1f} on {os.cpu_count()} cores before: the pace bound is not asserted")


# ------------------------------------------------------------------ huge frames (major defect 3)


def test_a_1_gib_frame_costs_the_agent_nothing(procs: Procs, tmp_path: Path) -> None:
    proc, endpoint = _start_agent(procs, tmp_path, 30.0)
    ep = parse_endpoint(endpoint)
    windows: list[tuple[float, int, float]] = []
    _windows(proc, windows)
    time.sleep(1.0)
    with PeakRss(proc.pid) as rss:
        took_router = attack_connect(ep.host, ep.port + 1, "DEALER", GIB)  # snapshot ROUTER
        took_pub = attack_connect(ep.host, ep.port, "SUB", GIB)  # subscriptions on PUB
    assert took_router < 64 * MB and took_pub < 64 * MB  # refused after the header
    assert rss.growth <= 64 * MB, f"RSS grew by {rss.growth / MB:.0f} MB"
    _serves_a_monitor(endpoint)
    assert proc.poll() is None
    print(f"1 GiB frames to ROUTER and PUB: agent RSS +{rss.growth / MB:.1f} MB")


def test_a_flood_of_frames_upstream_on_the_pub_socket_is_bounded(
    procs: Procs, tmp_path: Path
) -> None:
    """The PUB socket is an XPUB (it counts subscribers): what an XSUB peer sends it, junk or
    subscriptions to one topic, must neither grow memory nor stop the agent."""
    proc, endpoint = _start_agent(procs, tmp_path, 30.0)
    ep = parse_endpoint(endpoint)
    time.sleep(1.0)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        peer = ctx.socket(zmq.XSUB)
        peer.setsockopt(zmq.LINGER, 0)
        peer.connect(ep.pub)
        time.sleep(0.3)
        with PeakRss(proc.pid) as rss:
            for i in range(300_000):
                peer.send(b"junk" * 25 if i % 2 else b"\x01topic")
            time.sleep(1.5)
        assert rss.growth <= 64 * MB, f"RSS grew by {rss.growth / MB:.0f} MB"
    finally:
        ctx.destroy(linger=0)
    _serves_a_monitor(endpoint)
    assert proc.poll() is None
    print(f"300k frames upstream on PUB: agent RSS +{rss.growth / MB:.1f} MB")


def test_a_flood_of_distinct_subscriptions_is_bounded_and_monitors_come_back(
    procs: Procs, tmp_path: Path
) -> None:
    """libzmq keeps every distinct topic a peer subscribes to (~19 KB per random topic of up to
    1,000 bytes: 20,000 grew an agent by 380 MB; the frame limit now refuses those): past what a
    monitor needs, the agent binds its PUB socket again, which drops the flooding peer with its
    topics; a genuine monitor connected all along reconnects and gets the run's messages."""
    proc, endpoint = _start_agent(procs, tmp_path, 15.0)
    ep = parse_endpoint(endpoint)
    watcher = Client([endpoint])
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not watcher.poll(0.1):
            pass
        time.sleep(1.5)  # past the first measurements' one-off allocations
        rnd = random.Random(0)
        with PeakRss(proc.pid) as big:  # long topics: the frame limit hangs up at the first
            peer = ctx.socket(zmq.XSUB)
            peer.setsockopt(zmq.LINGER, 0)
            peer.connect(ep.pub)
            time.sleep(0.3)
            for _ in range(20_000):
                peer.send(b"\x01" + rnd.randbytes(rnd.randint(128, 1000)))
            time.sleep(1.0)
            peer.close()
        assert big.growth <= 16 * MB, f"RSS grew by {big.growth / MB:.0f} MB"
        with PeakRss(proc.pid) as rss:  # short ones: the socket is bound again
            peer = ctx.socket(zmq.XSUB)
            peer.setsockopt(zmq.LINGER, 0)
            peer.connect(ep.pub)
            time.sleep(0.3)
            for _ in range(10_000):  # all at once in libzmq's topics: ~35 MB at worst
                peer.send(b"\x01" + rnd.randbytes(rnd.randint(1, 127)))
            time.sleep(2.0)
        assert rss.growth <= 64 * MB, f"RSS grew by {rss.growth / MB:.0f} MB"
        seen = watcher.stats.received
        deadline = time.monotonic() + 20  # the watcher is back: it gets the run's messages
        while time.monotonic() < deadline and watcher.stats.received < seen + 5:
            watcher.poll(0.1)
        assert watcher.stats.received >= seen + 5
    finally:
        watcher.close()
        ctx.destroy(linger=0)
    assert proc.poll() is None
    proc.wait(60)
    said = [m for m in read_session(tmp_path / "run.stiff")[0] if m.kind == "event"]
    assert any(m.code == "publish-reset" for m in said), "the run never said it"
    print(f"distinct subscriptions on PUB: +{big.growth / MB:.1f}, +{rss.growth / MB:.1f} MB")


# ------------------------------------------------------------------ in-process publisher


@pytest.fixture
def publisher(tmp_path: Path) -> Publisher:
    pub = Publisher(
        "run-x", endpoint=f"tcp://127.0.0.1:{free_port_pair()}", record=tmp_path / "p.stiff"
    )
    pub.start()
    yield pub  # type: ignore[misc]
    pub.close(2.0)


def _dealer(ctx: zmq.Context[zmq.Socket[bytes]], pub: Publisher) -> zmq.Socket[bytes]:
    assert pub.endpoint is not None
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(pub.endpoint.snapshot)
    return d


def _read_snapshot(d: zmq.Socket[bytes], timeout: float = 20.0) -> tuple[list[int], int]:
    seqs, end = [], -2
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not d.poll(100):
            continue
        frames = d.recv_multipart()
        if frames[0] == SNAPSHOT_MESSAGE:
            seqs.append(p.decode(frames[1:]).seq)
        elif frames[0] == SNAPSHOT_END:
            end = decode_control(frames[1])["seq"]
        elif frames[0] == SNAPSHOT_DONE:
            return seqs, end
    raise AssertionError(f"no snapshot done; got {len(seqs)} messages")


def _spectrum(step: int) -> Outgoing:
    values = list(range(2000))  # 16 kB: 3,000 of them are more than any socket buffer holds
    return Outgoing(p.Spectrum, step, time.time(), {"name": "s", "values": values, "attrs": {}})


def test_slices_serve_a_reader_while_a_non_reader_is_dropped(publisher: Publisher) -> None:
    for i in range(3000):
        assert publisher.submit(_spectrum(i))
    time.sleep(0.5)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    hog = ctx.socket(zmq.DEALER)
    hog.setsockopt(zmq.LINGER, 0)
    hog.setsockopt(zmq.RCVHWM, 1)
    hog.setsockopt(zmq.RCVBUF, 4096)
    assert publisher.endpoint is not None
    hog.connect(publisher.endpoint.snapshot)
    reader = _dealer(ctx, publisher)
    publisher_snapshots = publisher.snapshots
    assert publisher_snapshots is not None
    publisher_snapshots.stall_timeout = 1.0
    try:
        for _ in range(50):  # repeat requests coalesce into one snapshot
            hog.send_multipart(encode_control(SNAPSHOT_REQUEST, {"v": 1}))
        time.sleep(0.3)
        reader.send_multipart(encode_control(SNAPSHOT_REQUEST, {"v": 1}))
        for i in range(3000, 3100):  # live publishing goes on meanwhile
            publisher.submit(_scalars(i))
        seqs, end = _read_snapshot(reader)
        assert seqs == sorted(set(seqs)) and len(seqs) >= 3000  # heartbeats are not history
        assert end >= seqs[-1] >= 2999
        deadline = time.monotonic() + 10
        while publisher_snapshots.stats.dropped_peers < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = publisher_snapshots.stats
        assert stats.dropped_peers == 1 and stats.coalesced >= 40 and stats.served == 1
    finally:
        hog.close(0)
        reader.close(0)
        ctx.term()


def test_close_writes_everything_queued_while_a_peer_hogs_snapshots(tmp_path: Path) -> None:
    pub = Publisher(
        "run-c", endpoint=f"tcp://127.0.0.1:{free_port_pair()}", record=tmp_path / "c.stiff"
    )
    pub.start()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    hog = _dealer(ctx, pub)
    try:
        for i in range(3000):
            pub.submit(_scalars(i))
        time.sleep(0.3)
        hog.send_multipart(encode_control(SNAPSHOT_REQUEST, {"v": 1}))
        for i in range(3000, 9000):
            pub.submit(_scalars(i))
        pub.submit(Outgoing(p.Bye, 8999, time.time(), {"reason": "closed"}))
        assert pub.close(10.0)
    finally:
        hog.close(0)
        ctx.term()
    assert _check_session(tmp_path / "c.stiff", 9000).dropped == 0


def test_unencodable_message_uses_no_seq_and_is_counted(publisher: Publisher) -> None:
    publisher.submit(_scalars(0))
    bad = {"level": "info", "code": "x", "message": "y", "attrs": {"obj": object()}}
    publisher.submit(Outgoing(p.Event, 1, time.time(), bad))
    publisher.submit(_scalars(2))
    publisher.submit(Outgoing(p.Bye, 2, time.time(), {"reason": "closed"}))
    assert publisher.close(5.0)
    assert publisher._record is not None
    msgs, _ = read_session(publisher._record)
    assert [m.seq for m in msgs] == list(range(len(msgs)))  # no hole for the bad one
    assert publisher.dropped == 1
    hb = msgs[-2]
    assert isinstance(hb, p.Heartbeat) and hb.dropped == 1  # the file says what was lost


def test_binding_beyond_loopback_without_curve_warns(tmp_path: Path) -> None:
    warnings: list[str] = []
    pub = Publisher("run-w", endpoint=f"tcp://0.0.0.0:{free_port_pair()}", warn=warnings.append)
    pub.start()
    pub.close(2.0)
    assert any("not loopback" in w and "CURVE" in w for w in warnings)
    quiet: list[str] = []
    pub = Publisher("run-q", endpoint=f"tcp://127.0.0.1:{free_port_pair()}", warn=quiet.append)
    pub.start()
    pub.close(2.0)
    assert quiet == []
