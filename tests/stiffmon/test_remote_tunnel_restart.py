"""ssh:// tunnels that lose their ssh: it is started again on the same ports, and it says why.

A fake ``ssh`` (a Python script) listens on the ``-L`` local ports, as ssh does, writes its pid
to a file and, when told, a lot of stderr first (ssh's ``channel N: open failed`` lines while the
remote agent is down). Killing it is what sshd dying does to a real ssh.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stiffmon.client import Client
from stiffmon.tunnel import Tunnel, take_tunnel_warnings, tunnel_label

FAKE_SSH = """#!{python}
import os, socket, sys, time
args = sys.argv[1:]
ports = [int(args[i + 1].split(":")[1]) for i, a in enumerate(args) if a == "-L"]
open({pidfile!r}, "a").write(f"{{os.getpid()}}\\n")
n = int(os.environ.get("FAKE_SSH_STDERR", "0"))
for _ in range(n // 60):
    sys.stderr.write("channel 3: open failed: connect failed: Connection refused\\n")
sys.stderr.flush()
socks = []
for p in ports:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", p))
    s.listen(16)
    socks.append(s)
while True:
    time.sleep(1)
"""


@pytest.fixture
def fake_ssh(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    pidfile = tmp_path / "pids"
    exe = tmp_path / "ssh"
    exe.write_text(FAKE_SSH.format(python=sys.executable, pidfile=str(pidfile)))
    exe.chmod(0o755)
    yield exe, pidfile
    for line in pidfile.read_text().split() if pidfile.exists() else []:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line), signal.SIGKILL)


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _until(cond: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_a_dead_ssh_is_started_again_on_the_same_port_and_says_why(
    fake_ssh: tuple[Path, Path],
) -> None:
    exe, pidfile = fake_ssh
    with Tunnel("ssh://alice@gpu-box:7000", ssh=str(exe), timeout=5, forward="tcp") as t:
        port, address = t.local_port, t.endpoint.pub
        first = int(pidfile.read_text().split()[0])
        os.kill(first, signal.SIGKILL)  # sshd died: ssh exits
        assert _until(lambda: t.down_reason != "", 3), "the tunnel never noticed ssh exit"
        assert "ssh down: ssh exited" in tunnel_label(address)
        assert _until(lambda: len(pidfile.read_text().split()) >= 2, 5), "ssh not started again"
        assert _until(lambda: t.down_reason == "" and _answers(port), 5)
        said = take_tunnel_warnings(address)
        assert any("ssh exited" in w and "connecting again" in w for w in said), said
        assert any("up again" in w for w in said), said
        assert tunnel_label(address) == "ssh://alice@gpu-box:7000"
        assert t.restarts == 1
    assert not _answers(port)  # closed: no ssh left behind
    assert take_tunnel_warnings(address) == []


def test_a_chatty_ssh_never_fills_its_stderr_pipe(
    fake_ssh: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ssh writes a line per refused forward; unread, the 64 KiB pipe filled and ssh blocked."""
    exe, _ = fake_ssh
    monkeypatch.setenv("FAKE_SSH_STDERR", str(400_000))
    with Tunnel("ssh://gpu-box:7000", ssh=str(exe), timeout=5, forward="tcp") as t:
        assert _answers(t.local_port)


def test_the_client_passes_the_tunnels_news_on(fake_ssh: tuple[Path, Path]) -> None:
    exe, pidfile = fake_ssh
    with (
        Tunnel("ssh://gpu-box:7000", ssh=str(exe), timeout=5, forward="tcp") as t,
        Client([t.endpoint]) as c,
    ):
        os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
        said: list[str] = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not any("up again" in w for w in said):
            c.poll(0.1)
            said += c.take_warnings()
        assert any("ssh://gpu-box:7000: ssh exited" in w for w in said), said
        assert any("up again" in w for w in said), said


def test_a_local_port_taken_meanwhile_is_named_and_waited_for(
    fake_ssh: tuple[Path, Path],
) -> None:
    exe, pidfile = fake_ssh
    with Tunnel("ssh://gpu-box:7000", ssh=str(exe), timeout=5, forward="tcp") as t:
        port, address = t.local_port, t.endpoint.pub
        squat = socket.socket()
        squat.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
        assert _until(lambda: t.down_reason != "", 3)
        squat.bind(("127.0.0.1", port))  # another user's process takes the port meanwhile
        squat.listen()
        assert _until(lambda: "taken by another process" in t.down_reason, 5), t.down_reason
        assert f"local port {port} taken" in tunnel_label(address)
        assert len(pidfile.read_text().split()) == 1  # no ssh started while it is taken
        time.sleep(7.5)  # taken a while: a doubling wait (1, 2, 4, 8 s) would now be at 8 s
        squat.close()
        back = time.monotonic()
        assert _until(lambda: t.down_reason == "" and _answers(port), 4), t.down_reason
        assert time.monotonic() - back < 2.5  # looked at every second
        said = take_tunnel_warnings(address)
        assert sum("taken by another process" in w for w in said) == 1, said  # said once
