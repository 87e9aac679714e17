"""ssh:// tunnels end in unix sockets inside a private directory, not in local TCP ports.

A local TCP port is anyone's to bind once ssh has died: the monitor's socket, which libzmq
connects again every 100 ms, could then talk to another user's process. A fake ``ssh`` (a Python
script) listens on the ``-L`` local ends as ssh does: a unix socket path, or a TCP port, and
honours ``StreamLocalBindUnlink``; it can refuse unix forwards as an OpenSSH older than 6.7 does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stiffmon.client import Client
from stiffmon.tunnel import Tunnel, take_tunnel_warnings
from stiffmon.tunnel_local import PUB_SOCK, SNAP_SOCK, UnixEndpoint

FAKE_SSH = """#!{python}
import os, socket, sys, time
args = sys.argv[1:]
specs = [args[i + 1] for i, a in enumerate(args) if a == "-L"]
open({pidfile!r}, "a").write(f"{{os.getpid()}}\\n")
open({argvfile!r}, "a").write("\\n".join(args) + "\\n")
unlink = "StreamLocalBindUnlink=yes" in args
if os.environ.get("FAKE_SSH_OLD") and unlink:  # OpenSSH < 6.7 reads its options first
    sys.stderr.write("command-line line 0: Bad configuration option: streamlocalbindunlink\\n")
    sys.exit(255)
socks = []
for spec in specs:
    here = spec.rsplit(":", 2)[0]
    if here.startswith("/"):
        if os.environ.get("FAKE_SSH_OLD"):
            sys.stderr.write(f"Bad local forwarding specification '{{spec}}'\\n")
            sys.exit(255)
        if unlink and os.path.exists(here):
            os.unlink(here)
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(here)
        except OSError as exc:
            sys.stderr.write(f"unix_listener: cannot bind to path {{here}}: {{exc}}\\n")
            sys.exit(255)
    else:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", int(here.split(":")[1])))
    s.listen(16)
    socks.append(s)
while True:
    time.sleep(1)
"""


@pytest.fixture
def fake_ssh(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    pidfile, argvfile = tmp_path / "pids", tmp_path / "argv"
    exe = tmp_path / "ssh"
    exe.write_text(
        FAKE_SSH.format(python=sys.executable, pidfile=str(pidfile), argvfile=str(argvfile))
    )
    exe.chmod(0o755)
    yield exe, pidfile, argvfile
    for line in pidfile.read_text().split() if pidfile.exists() else []:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line), signal.SIGKILL)


def _until(cond: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def _pids(pidfile: Path) -> list[int]:
    return [int(x) for x in pidfile.read_text().split()]


@pytest.mark.skipif(os.name == "nt", reason="no unix sockets for ZeroMQ on Windows")
def test_the_local_end_is_unix_sockets_in_a_directory_only_we_can_enter(
    fake_ssh: tuple[Path, Path, Path],
) -> None:
    exe, _, argvfile = fake_ssh
    with Tunnel("ssh://gpu-box:7000", ssh=str(exe), timeout=5) as t:
        ep = t.endpoint
        assert isinstance(ep, UnixEndpoint)
        assert ep.pub.startswith("ipc://") and ep.snapshot.startswith("ipc://"), ep
        d = Path(ep.directory)
        st = os.lstat(d)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == os.getuid()
        assert ep.pub == f"ipc://{d / PUB_SOCK}" and ep.snapshot == f"ipc://{d / SNAP_SOCK}"
        argv = argvfile.read_text().splitlines()
        assert f"{d / PUB_SOCK}:127.0.0.1:7000" in argv
        assert f"{d / SNAP_SOCK}:127.0.0.1:7001" in argv
        assert "StreamLocalBindUnlink=yes" in argv  # a restarted ssh replaces stale sockets
        assert not any(w for w in take_tunnel_warnings(ep.pub) if "TCP" in w)
    assert not d.exists()  # closed: the directory and its sockets are gone


@pytest.mark.skipif(os.name == "nt", reason="no unix sockets for ZeroMQ on Windows")
def test_a_restarted_ssh_takes_its_stale_sockets_back(fake_ssh: tuple[Path, Path, Path]) -> None:
    exe, pidfile, _ = fake_ssh
    with Tunnel("ssh://gpu-box:7000", ssh=str(exe), timeout=5) as t, Client([t.endpoint]) as c:
        assert t.local_dir is not None
        os.kill(_pids(pidfile)[0], signal.SIGKILL)  # sshd died; ssh's socket files stay behind
        assert (t.local_dir / PUB_SOCK).exists()
        said: list[str] = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not any("up again" in w for w in said):
            c.poll(0.1)
            said += c.take_warnings()
        assert any("ssh exited" in w for w in said), said
        assert any("up again" in w for w in said), said
        assert t.restarts == 1 and len(_pids(pidfile)) == 2


@pytest.mark.skipif(
    not hasattr(os, "fork") or not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="needs root, to act as another user (nobody)",
)
def test_another_user_cannot_take_the_local_end_while_ssh_is_down(
    fake_ssh: tuple[Path, Path, Path],
) -> None:
    """Another user's process (uid 65534) tries to listen where the monitor connects, in the
    seconds between ssh's death and its restart: a TCP port it could take; the unix socket in
    the private directory it cannot."""
    exe, pidfile, _ = fake_ssh
    with Tunnel("ssh://gpu-box:7000", ssh=str(exe), timeout=5) as t:
        os.kill(_pids(pidfile)[0], signal.SIGKILL)
        assert _until(lambda: t.down_reason != "", 3)
        took = []
        for address in (t.endpoint.pub, t.endpoint.snapshot):
            pid = os.fork()
            if pid == 0:  # the stranger: only socket calls, then _exit
                code = 0
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    if address.startswith("ipc://"):
                        path = address[len("ipc://") :]
                        with contextlib.suppress(OSError):
                            os.unlink(path)  # as StreamLocalBindUnlink would
                        s = socket.socket(socket.AF_UNIX)
                        s.bind(path)
                    else:
                        s = socket.socket()
                        s.bind(("127.0.0.1", int(address.rsplit(":", 1)[1])))
                    s.listen(1)
                    code = 1  # took it
                except OSError:
                    code = 0
                os._exit(code)
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) == 1:
                took.append(address)
        assert took == [], f"another user's process took the monitor's address(es) {took}"


def test_an_ssh_without_unix_forwards_falls_back_to_tcp_and_says_so(
    fake_ssh: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    exe, pidfile, _ = fake_ssh
    monkeypatch.setenv("FAKE_SSH_OLD", "1")  # knows no StreamLocalBindUnlink, nor socket paths
    with Tunnel("ssh://gpu-box:7000", ssh=str(exe), timeout=5) as t:
        assert t.endpoint.pub.startswith("tcp://127.0.0.1:"), t.endpoint
        said = take_tunnel_warnings(t.endpoint.pub)
        assert any("local TCP ports" in w and "another local user" in w for w in said), said
        assert t.local_dir is None
    assert not list(Path(p) for p in _leftover_dirs(pidfile))


def _leftover_dirs(pidfile: Path) -> list[str]:
    """The private directories the fake ssh was given that still exist."""
    argv = (pidfile.parent / "argv").read_text().splitlines()
    return [
        os.path.dirname(a.rsplit(":", 2)[0])
        for a in argv
        if a.startswith("/") and os.path.isdir(os.path.dirname(a.rsplit(":", 2)[0]))
    ]


@pytest.mark.skipif(os.name == "nt", reason="no unix sockets for ZeroMQ on Windows")
def test_a_socket_directory_removed_while_ssh_is_down_is_made_again(
    fake_ssh: tuple[Path, Path, Path],
) -> None:
    """A cleaner of /tmp removed it: made again (0700, ours) at the same path, so the monitor's
    ``ipc://`` addresses still lead to the restarted ssh."""
    exe, pidfile, _ = fake_ssh
    with Tunnel("ssh://gpu-box:7000", ssh=str(exe), timeout=5) as t:
        assert t.local_dir is not None
        d = t.local_dir
        os.kill(_pids(pidfile)[0], signal.SIGKILL)
        shutil.rmtree(d)
        assert _until(lambda: t.restarts == 1 and t.down_reason == "", 6), t.down_reason
        assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700 and (d / PUB_SOCK).exists()


@pytest.mark.skipif(os.name == "nt", reason="no unix sockets for ZeroMQ on Windows")
def test_a_socket_directory_that_is_not_private_any_more_is_refused_and_said(
    fake_ssh: tuple[Path, Path, Path],
) -> None:
    """Made again meanwhile by someone else (here: open to all): ssh is not started there."""
    exe, pidfile, _ = fake_ssh
    with Tunnel("ssh://gpu-box:7000", ssh=str(exe), timeout=5) as t:
        assert t.local_dir is not None
        d, address = t.local_dir, t.endpoint.pub
        os.kill(_pids(pidfile)[0], signal.SIGKILL)
        shutil.rmtree(d)
        d.mkdir()
        d.chmod(0o777)
        assert _until(lambda: "not private" in t.down_reason, 5), t.down_reason
        time.sleep(1.5)
        assert len(_pids(pidfile)) == 1  # no ssh started there
        said = take_tunnel_warnings(address)
        assert any("not ours or not private" in w and "giving up" in w for w in said), said
