"""How a run ends. SIGTERM (``kill``, SLURM, Kubernetes, ``timeout``): the agent flushes and says
bye, then the process dies as it would have (:mod:`stiffmon_agent.termination`). An uncaught
exception or Ctrl-C: the bye at exit says so, and the monitor shows it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stiffmon import protocol as p
from stiffmon.run_data import RunData
from stiffmon.session import read_session
from stiffmon.store import Store
from tests.conftest import ROOT, default_sigint

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    import torch
    from torch import nn
    from stiffmon_agent import Agent

    record, mode = sys.argv[1], sys.argv[2]
    say = lambda *a: print(*a, flush=True)
    if mode == "user":
        def mine(signum, frame):
            say("user handler ran")
            sys.exit(3)
        signal.signal(signal.SIGTERM, mine)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    agent = Agent(model, nn.CrossEntropyLoss(), opt, endpoint="", record=record, registry=False)
    if mode == "user":
        say("kept" if signal.getsignal(signal.SIGTERM) is mine else "replaced")
    say("ready")
    step = 0
    while True:
        if mode == "raise" and step == 30:
            model(x[:, :3])  # the user's shape error
        if mode == "end" and step == 30:
            break  # no close(): atexit's
        if mode == "closed" and step == 50:
            agent.close()
            say("closed")
            time.sleep(60)
        if mode == "fork" and step == 20:
            child = os.fork()
            if child == 0:  # a DataLoader worker, say: inherits the handler, not the threads
                time.sleep(60)
                os._exit(0)
            say(f"child {child}")
            reap = lambda: say(f"child-status {os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])}")
            threading.Thread(target=reap, daemon=True).start()
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        agent.step(loss)
        say(f"step {step}")
        step += 1
        time.sleep(0.0005)
    """
)


class Script:
    """The training script in a subprocess, its stdout in a file."""

    def __init__(self, tmp: Path, mode: str) -> None:
        self.record = tmp / f"{mode}.stiff"
        self.out = tmp / f"{mode}.out"
        script = tmp / "train.py"
        script.write_text(SCRIPT)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "agent")]),
        }
        with open(self.out, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), str(self.record), mode],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=default_sigint,
            )

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines()

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [ln for ln in self.lines() if ln.startswith(text)]
            if found:
                return found[-1]
            assert self.proc.poll() is None, f"script ended early: {self.out.read_text()}"
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} within {timeout} s: {self.out.read_text()[-2000:]}")

    def terminate(self, timeout: float = 20.0) -> int:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        assert time.monotonic() - t0 < 10, "the process must still die promptly"
        return rc

    def last_step(self) -> int:
        return max(int(ln.split()[1]) for ln in self.lines() if ln.startswith("step "))

    def messages(self) -> list[p.AnyMessage]:
        return read_session(self.record)[0]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def script(tmp_path: Path) -> Iterator[Callable[[str], Script]]:
    started: list[Script] = []

    def start(mode: str) -> Script:
        s = Script(tmp_path, mode)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


def recorded_steps(msgs: list[p.AnyMessage]) -> set[int]:
    return {int(s) for m in msgs if isinstance(m, p.Columns) for s in m.steps}


def byes(msgs: list[p.AnyMessage]) -> list[str]:
    return [m.reason for m in msgs if isinstance(m, p.Bye)]


def test_sigterm_flushes_every_step_and_says_bye(script: Callable[[str], Script]) -> None:
    s = script("default")
    s.wait_for("step 0")
    time.sleep(1.0)
    assert s.terminate() == -signal.SIGTERM  # exactly as without the agent: killed by it
    last = s.last_step()
    msgs = s.messages()
    assert isinstance(msgs[-1], p.Bye) and msgs[-1].reason == "terminated"
    assert byes(msgs) == ["terminated"]
    steps = recorded_steps(msgs)
    assert set(range(last + 1)) <= steps, f"lost {sorted(set(range(last + 1)) - steps)[:5]}…"


def test_user_sigterm_handler_is_left_alone(script: Callable[[str], Script]) -> None:
    s = script("user")
    assert s.wait_for("kept") == "kept"
    s.wait_for("step 0")
    time.sleep(0.3)
    assert s.terminate() == 3  # the user's handler ran (and its exit went through atexit)
    # the signal may land between a print's text and its newline: "step 41user handler ran"
    assert any("user handler ran" in line for line in s.lines())
    assert byes(s.messages()) == ["exit"]


def test_sigterm_without_live_agents_just_dies(script: Callable[[str], Script]) -> None:
    s = script("closed")
    s.wait_for("closed")
    assert s.terminate() == -signal.SIGTERM
    msgs = s.messages()
    assert byes(msgs) == ["closed"]
    assert recorded_steps(msgs) == set(range(50))


def test_forked_child_does_not_flush_the_parents_agent(script: Callable[[str], Script]) -> None:
    s = script("fork")
    child = int(s.wait_for("child ").split()[1])
    s.wait_for("step 30")
    os.kill(child, signal.SIGTERM)
    assert s.wait_for("child-status", timeout=20) == f"child-status {-signal.SIGTERM}"
    assert s.proc.poll() is None  # the parent trains on
    assert s.terminate() == -signal.SIGTERM
    msgs = s.messages()
    assert byes(msgs) == ["terminated"]  # the parent's only: the child wrote nothing
    assert set(range(s.last_step() + 1)) <= recorded_steps(msgs)


def test_monitor_says_terminated() -> None:
    from stiffmon.run_data import RunData
    from stiffmon.summary import run_status

    rd = RunData("r", 0, finished=True, bye_reason="terminated")
    assert rd.health().text == "terminated (SIGTERM)" and rd.health().level == "ok"
    assert run_status(rd) == "terminated (SIGTERM)"
    assert run_status(RunData("r", 0, finished=True, bye_reason="closed")) == "finished"


@pytest.mark.parametrize(
    ("mode", "reason", "shown"),
    [
        ("raise", "error: RuntimeError", "ended by RuntimeError"),
        ("sigint", "interrupted", "interrupted (Ctrl-C)"),
        ("end", "exit", "exited"),
    ],
)
def test_the_bye_at_exit_says_how_the_script_ended(
    script: Callable[[str], Script], mode: str, reason: str, shown: str
) -> None:
    from stiffmon.summary import run_status

    s = script(mode)
    if mode == "sigint":
        s.wait_for("step 20")
        s.proc.send_signal(signal.SIGINT)
    rc = s.proc.wait(30)
    want = {"end": 0, "raise": 1, "sigint": -signal.SIGINT}[mode]  # as without the agent
    assert rc == want, s.out.read_text()[-2000:]
    if mode == "raise":
        assert "RuntimeError" in s.out.read_text()  # the user's traceback, unchanged
    msgs = s.messages()
    assert byes(msgs) == [reason]
    assert set(range(s.last_step() + 1)) <= recorded_steps(msgs)
    rd = read_store(s.record)
    assert run_status(rd) == shown
    assert rd.health().level == ("error" if mode == "raise" else "ok")


def read_store(path: Path) -> RunData:
    """The one run of a recording, as the monitor holds it."""
    store = Store()
    for m in read_session(path)[0]:
        store.apply(m, replay=True)
    (rd,) = store.runs.values()
    return rd


def test_an_interactive_session_keeps_saying_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A REPL or IPython keeps an earlier command's exception: not why the session ends."""
    from stiffmon_agent.termination import exit_reason

    monkeypatch.setattr(sys, "last_value", RuntimeError("earlier"), raising=False)
    monkeypatch.delattr(sys, "last_exc", raising=False)
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    monkeypatch.delattr(sys, "ps1", raising=False)
    assert exit_reason() == "error: RuntimeError"
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)
    assert exit_reason() == "exit"
