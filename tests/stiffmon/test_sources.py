"""Monitor sources: discovery of runs that start after the monitor, reconnects, replay timeline."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from stiffmon import protocol as p
from stiffmon.registry import RunEntry, register, unregister
from stiffmon.session import SessionWriter
from stiffmon.store import Store
from stiffmon.transport import (
    SNAPSHOT_DONE,
    SNAPSHOT_END,
    SNAPSHOT_MESSAGE,
    SNAPSHOT_REQUEST,
    encode_control,
    free_port_pair,
    parse_endpoint,
)
from stiffmon.tui.sources import LiveSource, ReplaySource


class FakeAgent:
    """A minimal agent without torch: PUB updates, ROUTER snapshots, a registry entry."""

    def __init__(self, endpoint: str, registry: Path | None = None) -> None:
        self.ep = parse_endpoint(endpoint)
        self.run = f"fake-{uuid.uuid4().hex[:8]}"
        self.registry = registry
        self.history: list[list[bytes]] = []
        self.seq = -1
        self.stop = threading.Event()
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.router = self.ctx.socket(zmq.ROUTER)
        for s in (self.pub, self.router):
            s.setsockopt(zmq.LINGER, 0)
        self.pub.bind(self.ep.pub)
        self.router.bind(self.ep.snapshot)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        self.send(p.Hello, name="fake")
        if registry is not None:
            register(
                RunEntry(
                    self.run,
                    "fake",
                    str(self.ep),
                    os.getpid(),
                    socket.gethostname(),
                    time.time(),
                ),
                registry,
            )

    def send(self, cls: type[p.Message], step: int = 0, **fields: object) -> None:
        with self.lock:
            self.seq += 1
            frames = p.encode(cls(run=self.run, seq=self.seq, step=step, t=time.time(), **fields))
            self.history.append(frames)
            self.pub.send_multipart(frames)

    def _loop(self) -> None:
        step = 0
        while not self.stop.is_set():
            if self.router.poll(50):
                frames = self.router.recv_multipart()
                if len(frames) >= 2 and frames[1] == SNAPSHOT_REQUEST:
                    with self.lock:
                        for h in self.history:
                            self.router.send_multipart([frames[0], SNAPSHOT_MESSAGE, *h])
                        end = encode_control(SNAPSHOT_END, {"run": self.run, "seq": self.seq})
                        self.router.send_multipart([frames[0], *end])
                        done = encode_control(SNAPSHOT_DONE, {"runs": 1})
                        self.router.send_multipart([frames[0], *done])
            self.send(p.Scalars, step=step, names=("loss",), values=[1.0 / (step + 1)])
            step += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        if self.registry is not None:
            unregister(self.run, self.registry)
        self.pub.close(0)
        self.router.close(0)
        self.ctx.term()


@pytest.fixture
def agents() -> Iterator[Callable[..., FakeAgent]]:
    made: list[FakeAgent] = []

    def make(endpoint: str, registry: Path | None = None) -> FakeAgent:
        a = FakeAgent(endpoint, registry)
        made.append(a)
        return a

    yield make
    for a in made:
        if not a.stop.is_set():
            a.close()


def wait_for_run(src: LiveSource, store: Store, run: str, timeout: float = 6.0) -> float:
    """Drain ``src`` into ``store`` until ``run`` has per-step data; return the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        store.extend(src.drain())
        rd = store.runs.get(run)
        if rd is not None and rd.last_step > 0:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"run {run} not attached within {timeout} s: {src.describe()}")


def test_run_registered_after_the_monitor_started_is_attached(
    tmp_path: Path, agents: Callable[..., FakeAgent], live: Callable[..., LiveSource]
) -> None:
    src = live([], discover=True, registry=tmp_path, rescan=0.2)
    store = Store()
    time.sleep(0.5)
    assert src.endpoints == [] and "watching for local runs" in src.describe()
    agent = agents(f"tcp://127.0.0.1:{free_port_pair()}", tmp_path)
    assert wait_for_run(src, store, agent.run) < 5.0
    assert store.runs[agent.run].name == "fake"  # the hello came with the snapshot
    assert str(agent.ep) in src.describe()


def test_restarted_run_is_reattached(
    tmp_path: Path, agents: Callable[..., FakeAgent], live: Callable[..., LiveSource]
) -> None:
    src = live([], discover=True, registry=tmp_path, rescan=0.2)
    store = Store()
    first = agents(f"tcp://127.0.0.1:{free_port_pair()}", tmp_path)
    wait_for_run(src, store, first.run)
    first.close()
    # the restarted process registers a new run id, on another port ...
    second = agents(f"tcp://127.0.0.1:{free_port_pair()}", tmp_path)
    assert wait_for_run(src, store, second.run) < 5.0
    second.close()
    # ... or on the same port as before
    third = agents(str(second.ep), tmp_path)
    assert wait_for_run(src, store, third.run) < 5.0
    assert {first.run, second.run, third.run} <= set(store.runs)


def test_explicit_endpoint_keeps_reconnecting(
    agents: Callable[..., FakeAgent], live: Callable[..., LiveSource]
) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port_pair()}"
    src = live([endpoint])  # nothing listens there yet
    store = Store()
    time.sleep(0.5)
    first = agents(endpoint)
    wait_for_run(src, store, first.run)
    first.close()
    time.sleep(0.3)
    second = agents(endpoint)
    assert wait_for_run(src, store, second.run) < 5.0
    assert src.describe() == f"live: {endpoint}"


def test_bad_registry_entry_does_not_stop_discovery(
    tmp_path: Path, agents: Callable[..., FakeAgent], live: Callable[..., LiveSource]
) -> None:
    register(
        RunEntry("bad", "bad", "tcp://nowhere", os.getpid(), socket.gethostname(), 0.0), tmp_path
    )
    src = live([], discover=True, registry=tmp_path, rescan=0.2)
    store = Store()
    agent = agents(f"tcp://127.0.0.1:{free_port_pair()}", tmp_path)
    wait_for_run(src, store, agent.run)
    assert [str(e) for e in src.endpoints] == [str(agent.ep)]
    assert not (tmp_path / "bad.json").exists()  # the registry drops corrupt entries


def _session(path: Path, seconds: float, n: int = 50) -> None:
    with SessionWriter(path) as w:
        w.write(p.Hello(run="r", seq=0, step=0, t=1000.0, name="r"))
        for i in range(n):
            t = 1000.0 + seconds * i / (n - 1)
            w.write(p.Scalars.from_dict({"loss": 1.0}, run="r", seq=i + 1, step=i, t=t))


def test_replay_opens_at_the_start_and_plays_at_its_speed(tmp_path: Path) -> None:
    path = tmp_path / "a.stiff"
    _session(path, seconds=10.0)
    src = ReplaySource([path], speed=2.0, at_end=False)
    src.load()
    store = Store()
    src.open(store)
    assert src.playing and src.position == 0 and "▶" in src.describe()
    src.advance(store, 0.5)  # 1 s of wall time at 2×: 2 s recorded, 9.8 of 49 intervals
    src.advance(store, 0.5)
    assert store.runs["r"].last_step == 9
    assert src.describe().endswith("t+2.0s")
    src.advance(store, 30.0)  # a stalled frame: counts as 0.5 s
    assert src.describe().endswith("t+3.0s")
    src.speed = 10.0
    for _ in range(20):
        src.advance(store, 0.5)
    assert store.runs["r"].last_step == 49 and not src.playing
    assert src.clock == src.t_end  # the clock stops with the data


def test_replay_at_end_for_screenshots(tmp_path: Path) -> None:
    path = tmp_path / "a.stiff"
    _session(path, seconds=10.0)
    src = ReplaySource([path])
    src.load()
    store = Store()
    src.open(store)
    assert not src.playing and src.position == len(src.messages)
    assert store.runs["r"].last_step == 49


def test_follow_clock_never_runs_past_the_data(tmp_path: Path) -> None:
    path = tmp_path / "a.stiff"
    _session(path, seconds=45.0)
    src = ReplaySource([path], follow=True, speed=10.0, at_end=False)
    src.load()
    store = Store()
    src.open(store)
    for _ in range(200):  # 100 s of wall time at 10×: far past the 45 s recorded
        src.advance(store, 0.5)
        assert src.clock <= src.t_end
    assert src.playing  # following: waits for more
    with SessionWriter(path) as w:  # the writer adds a message 2 s later
        w.write(p.Scalars.from_dict({"loss": 1.0}, run="r", seq=51, step=50, t=1047.0))
    src.load()
    src.advance(store, 0.1)  # 1 s of recorded time: not there yet
    assert store.runs["r"].last_step == 49 and src.clock <= 1046.0 + 1e-9
    src.advance(store, 0.2)
    assert store.runs["r"].last_step == 50 and src.describe().endswith("t+47.0s  following")


@pytest.mark.parametrize(
    ("seconds", "speed"), [(5.4, 1.0), (30.0, 2.0), (45.0, 5.0), (3600.0, 200.0), (1e6, 1000.0)]
)
def test_auto_speed_plays_a_session_in_about_20_seconds(
    tmp_path: Path, seconds: float, speed: float
) -> None:
    path = tmp_path / "a.stiff"
    _session(path, seconds=seconds, n=3)
    src = ReplaySource([path])
    src.load()
    assert src.auto_speed() == speed


def test_feed_marks_the_runs_whose_connection_is_lost() -> None:
    src = LiveSource([])
    src.queue.append(p.Hello(run="r", seq=0, step=0, t=1.0, name="r"))
    src.cut_off = {"r": "tcp://10.0.0.5:5555"}
    store = Store()
    assert src.feed(store) == []
    assert store.runs["r"].cut_off == "tcp://10.0.0.5:5555"
    src.cut_off = {}
    src.feed(store)
    assert store.runs["r"].cut_off == ""
