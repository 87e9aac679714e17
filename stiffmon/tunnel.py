"""``ssh://[user@]host[:port]``: reach a remote agent's loopback port through an SSH tunnel.

``port`` is the remote agent's port (default 5555); its snapshot port (port + 1) is forwarded
too. The system ``ssh`` client runs with ``-N -L`` and ``ExitOnForwardFailure``, in batch mode
(keys or an agent, no password prompts), so ``~/.ssh/config`` applies as usual.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

from stiffmon.transport import DEFAULT_PORT, Endpoint, free_port_pair

_SSH = re.compile(r"^ssh://(?:(?P<user>[^@/]+)@)?(?P<host>\[[^\]]+\]|[^:/]+)(?::(?P<port>\d+))?/?$")


class TunnelError(RuntimeError):
    """The SSH tunnel could not be opened; the message says why (with ssh's own words)."""


@dataclass(frozen=True)
class SshTarget:
    user: str | None
    host: str
    port: int

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


def parse_ssh(url: str) -> SshTarget:
    """Parse ``ssh://[user@]host[:port]``.

    Raises:
        TunnelError: For anything else, and for a user or host starting with ``-`` (ssh would
            read it as an option, e.g. ``-oProxyCommand=...``).
    """
    m = _SSH.match(url.strip())
    if not m:
        raise TunnelError(f"not an ssh://[user@]host[:port] address: {url!r}")
    user, host = m.group("user"), m.group("host")
    if host.startswith("-") or (user or "").startswith("-"):
        raise TunnelError(f"refusing an ssh user or host that starts with '-': {url!r}")
    port = int(m.group("port") or DEFAULT_PORT)
    if not 0 < port < 65535:
        raise TunnelError(f"port {port} out of range in {url!r}")
    return SshTarget(user, host, port)


class Tunnel:
    """An ``ssh -N -L`` child process forwarding a local port pair to the remote agent."""

    def __init__(
        self,
        url: str,
        *,
        ssh: str = "ssh",
        ssh_port: int | None = None,
        extra_args: tuple[str, ...] = (),
        timeout: float = 15.0,
    ) -> None:
        self.target = parse_ssh(url)
        exe = shutil.which(ssh)
        if exe is None:
            raise TunnelError(f"'{ssh}' not found: install an OpenSSH client to watch ssh:// runs")
        self.local_port = free_port_pair()
        rp = self.target.port
        cmd = [
            exe,
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ServerAliveInterval=15",
            "-L",
            f"127.0.0.1:{self.local_port}:127.0.0.1:{rp}",
            "-L",
            f"127.0.0.1:{self.local_port + 1}:127.0.0.1:{rp + 1}",
        ]
        if ssh_port:
            cmd += ["-p", str(ssh_port)]
        cmd += [*extra_args, "--", self.target.destination]  # never an option
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() if self.proc.stderr else b"").decode(
                    errors="replace"
                )
                raise TunnelError(
                    f"ssh to {self.target.destination} failed (exit {self.proc.returncode}): "
                    f"{err.strip() or 'no message'}"
                )
            with socket.socket() as s:
                s.settimeout(0.2)
                if s.connect_ex(("127.0.0.1", self.local_port)) == 0:
                    break
            if time.monotonic() > deadline:
                self.close()
                raise TunnelError(
                    f"ssh tunnel to {self.target.destination} not up after {timeout:.0f} s"
                )
            time.sleep(0.1)

    @property
    def endpoint(self) -> Endpoint:
        """The local end of the tunnel."""
        return Endpoint("127.0.0.1", self.local_port)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            if self.proc.poll() is None:
                self.proc.kill()
        if self.proc.stderr:
            self.proc.stderr.close()

    def __enter__(self) -> Tunnel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
