"""A forked child (a DataLoader worker, a ``multiprocessing`` helper) keeps none of the agent's
TCP sockets: after a ``kill -9`` of the training process the monitor sees the connection lost,
not a quiet one (:mod:`stiffmon_agent.fork_guard`)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stiffmon.client import Client
from stiffmon.transport import free_port_pair
from stiffmon_agent.fork_guard import close_inherited
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="Linux /proc")

SCRIPT = textwrap.dedent(
    """
    import multiprocessing as mp, os, socket, sys, time
    import torch
    from torch import nn
    from stiffmon_agent import Agent

    port = int(sys.argv[1])
    say = lambda *a: print(*a, flush=True)

    def count(ports):
        n = 0
        for name in os.listdir("/proc/self/fd"):
            try:
                s = socket.socket(fileno=int(name))
            except OSError:
                continue
            try:
                n += s.family == socket.AF_INET and s.getsockname()[1] in ports
            except OSError:
                pass
            s.detach()
        return n

    def helper(ports, q):  # a long-lived forked helper: reports, then lives on
        q.put(count(ports))
        time.sleep(120)

    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = Agent(model, nn.CrossEntropyLoss(), opt, endpoint=f"tcp://127.0.0.1:{port}",
                  registry=False)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    step = 0

    def train(n):
        global step
        for _ in range(n):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step(); agent.step(loss)
            step += 1
            time.sleep(0.01)

    while not os.path.exists(sys.argv[2]):  # the test's monitor connected
        train(1)
    ports = {port, port + 1}
    say("parent", count(ports))
    q = mp.get_context("fork").Queue()
    child = mp.get_context("fork").Process(target=helper, args=(ports, q), daemon=False)
    child.start()
    say("child", q.get(timeout=30), child.pid)
    while True:
        train(1)
    """
)


def test_a_forked_helper_keeps_no_agent_socket_and_a_kill_reads_as_lost(tmp_path: Path) -> None:
    port = free_port_pair()
    script, go, out = tmp_path / "train.py", tmp_path / "go", tmp_path / "out"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "agent")])}
    endpoint = f"tcp://127.0.0.1:{port}"
    child_pid = 0
    with open(out, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(port), str(go)], stdout=f, stderr=f, env=env
        )
    try:
        with Client([endpoint], snapshot_timeout=0.5) as client:
            deadline = time.monotonic() + 60
            while not any(m.run for m, _ in client.poll(0.1)):  # connected and hearing it
                assert time.monotonic() < deadline and proc.poll() is None, out.read_text()
            go.touch()
            while "child" not in out.read_text():
                assert time.monotonic() < deadline and proc.poll() is None, out.read_text()
                client.poll(0.1)
            lines = dict(ln.split(" ", 1) for ln in out.read_text().splitlines() if " " in ln)
            assert int(lines["parent"]) >= 3  # 2 listening + the monitor's connection(s)
            held, child_pid = (int(v) for v in lines["child"].split())
            assert held == 0, "the forked helper kept the agent's sockets"
            proc.kill()  # the training process dies; its forked helper lives on
            proc.wait(10)
            os.kill(child_pid, 0)  # still alive
            deadline = time.monotonic() + 15
            while not client.cut_off() and time.monotonic() < deadline:
                client.poll(0.1)
            assert set(client.cut_off().values()) == {endpoint}  # lost, not merely quiet
    finally:
        proc.kill()
        proc.wait(10)
        if child_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child_pid, signal.SIGKILL)


def test_close_inherited_closes_only_the_sockets_of_its_ports() -> None:
    mine, other = socket.socket(), socket.socket()
    try:
        mine.bind(("127.0.0.1", 0))
        mine.listen()
        other.bind(("127.0.0.1", 0))
        other.listen()
        r, w = os.pipe()  # not a socket: left alone
        assert close_inherited({mine.getsockname()[1]}) == 1
        with pytest.raises(OSError):
            os.fstat(mine.fileno())  # closed under the object
        assert other.getsockname()[1] > 0
        os.fstat(r)
        os.close(r)
        os.close(w)
        assert close_inherited(set()) == 0
    finally:
        mine.detach()
        other.close()
