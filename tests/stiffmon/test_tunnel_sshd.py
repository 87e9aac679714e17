"""A real ``ssh`` through a real ``sshd`` on loopback: the unix-socket local end comes back after
ssh is killed (the socket files a killed ssh leaves behind would make the next one fail to bind
without ``StreamLocalBindUnlink``). Skipped where sshd / ssh / ssh-keygen are not installed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stiffmon.transport import free_port_pair
from stiffmon.tunnel import Tunnel
from stiffmon.tunnel_local import PUB_SOCK


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    exe = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
    if exe is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("sshd / ssh / ssh-keygen not installed")
    if os.name == "nt":
        pytest.skip("no unix sockets for ZeroMQ on Windows")
    d = tmp_path / "sshd"
    d.mkdir()
    for key in ("host_key", "user_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True
        )
    auth = d / "authorized_keys"
    auth.write_text((d / "user_key.pub").read_text())
    auth.chmod(0o600)
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    port = free_port_pair()
    config = d / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {auth}\nPasswordAuthentication no\nStrictModes no\n"
        "PermitRootLogin yes\nUsePAM no\nAllowTcpForwarding yes\nPidFile none\n"
    )
    proc = subprocess.Popen([exe, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)
    time.sleep(0.5)
    if proc.poll() is not None:
        pytest.skip(f"sshd would not start: {proc.stderr.read().decode() if proc.stderr else ''}")
    yield port, d / "user_key"
    proc.terminate()
    proc.wait(10)


def _echo_server() -> tuple[int, socket.socket]:
    """The "remote agent": a loopback TCP port that echoes what it gets."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.sendall(conn.recv(64))

    threading.Thread(target=serve, daemon=True).start()
    return int(srv.getsockname()[1]), srv


def _echoes(sock_path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as u:
            u.settimeout(2)
            u.connect(str(sock_path))
            u.sendall(b"ping")
            return u.recv(64) == b"ping"
    except OSError:
        return False


def test_a_real_ssh_killed_comes_back_on_the_same_unix_sockets(sshd: tuple[int, Path]) -> None:
    ssh_port, key = sshd
    agent_port, srv = _echo_server()
    opts = ("-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null")
    user = os.environ.get("USER") or "root"
    try:
        with Tunnel(
            f"ssh://{user}@127.0.0.1:{agent_port}", ssh_port=ssh_port, extra_args=opts
        ) as t:
            assert t.local_dir is not None and t.endpoint.pub.startswith("ipc://")
            sock = t.local_dir / PUB_SOCK
            assert _echoes(sock), "nothing came through the tunnel"
            os.kill(t.proc.pid, signal.SIGKILL)  # what sshd dying does to ssh
            deadline = time.monotonic() + 12
            while time.monotonic() < deadline and not (t.restarts and t.down_reason == ""):
                time.sleep(0.1)
            assert t.restarts == 1 and t.down_reason == "", t.down_reason
            assert _echoes(sock), "nothing came through the restarted tunnel"
    finally:
        srv.close()
