"""``ssh://[user@]host[:port]``: reach a remote agent's loopback port through an SSH tunnel.

``port`` is the remote agent's port (default 5555); its snapshot port (port + 1) is forwarded
too. The system ``ssh`` client runs with ``-N -L`` and ``ExitOnForwardFailure``, in batch mode
(keys or an agent, no password prompts), so ``~/.ssh/config`` applies as usual.

The local end is a pair of unix sockets in a private (0700) directory, which ZeroMQ reaches as
``ipc://`` addresses: no other user can take them while ssh is down, as they could a local TCP
port (:mod:`stiffmon.tunnel_local`; local TCP ports are the fallback where unix sockets cannot
be used, and the tunnel says so).

The tunnel is supervised: when ``ssh`` exits (sshd restarted, the network or the remote host went
away, the key was revoked) a thread says so, with ssh's own last words, and starts it again on the
same local end after 1 s, doubling up to 30 s while it keeps failing (the count restarts after a
calm minute), so a monitor connected to :attr:`Tunnel.endpoint` comes back by itself when the remote
does. With the TCP fallback, a local port taken meanwhile by another process is reported and
waited for (ssh is not started while it is taken). ssh's stderr is always read (a pipe nobody
reads fills up with its ``channel N: open failed`` lines while the remote agent is down, and ssh
then blocks: the tunnel froze). What a tunnel has to say is queued for
:func:`take_tunnel_warnings`, which the monitor's client calls for the addresses it watches;
:func:`tunnel_label` names the ssh source of a local address and whether its ssh is down.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from stiffmon.transport import DEFAULT_PORT, Endpoint, free_port_pair
from stiffmon.tunnel_local import (
    TCP_FALLBACK_NOTE,
    UnixEndpoint,
    answers,
    ensure_private,
    forward_specs,
    make_private_dir,
    refused_unix_forward,
    remove_private_dir,
    unix_supported,
)

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


FIRST_DELAY = 1.0
MAX_DELAY = 30.0
CALM = 60.0
"""Seconds a restarted ssh must stay up for the next failure to wait :data:`FIRST_DELAY` again."""

_OPEN: dict[str, Tunnel] = {}  # local pub address -> the tunnel serving it
_OPEN_LOCK = threading.Lock()


def _tunnel(address: str) -> Tunnel | None:
    with _OPEN_LOCK:
        return _OPEN.get(address)


def take_tunnel_warnings(address: str) -> list[str]:
    """What the tunnel serving the local ``address`` (``tcp://127.0.0.1:port``) has said since
    the last call (ssh exited, started again, a port taken): oldest first; [] for no tunnel."""
    t = _tunnel(address)
    return t.take_warnings() if t is not None else []


def tunnel_label(address: str) -> str:
    """``address``, or for a tunnel's local address its ``ssh://`` source, with why while its
    ssh is down (``ssh://gpu-box:5555 (ssh down: Connection refused)``)."""
    t = _tunnel(address)
    if t is None:
        return address
    return f"{t.url} (ssh down: {t.down_reason})" if t.down_reason else t.url


class Tunnel:
    """An ``ssh -N -L`` child process forwarding a local port pair to the remote agent, started
    again whenever it exits until :meth:`close`.

    Args:
        url: ``ssh://[user@]host[:port]``.
        ssh: The ssh client (looked up on ``PATH``).
        ssh_port: The SSH server's port (``ssh -p``).
        extra_args: More ssh options, before the destination.
        timeout: Seconds for the first connection to come up (it raises if not); a restart
            that takes longer is ended and tried again.
        supervise: Start ssh again when it exits (False: it stays down).
        forward: The local end: ``"unix"`` sockets in a private directory, ``"tcp"`` ports on
            127.0.0.1, or ``"auto"``: unix sockets where they can be used (not on Windows, nor
            with an ssh that refuses them), else TCP.
    """

    def __init__(
        self,
        url: str,
        *,
        ssh: str = "ssh",
        ssh_port: int | None = None,
        extra_args: tuple[str, ...] = (),
        timeout: float = 15.0,
        supervise: bool = True,
        forward: str = "auto",
    ) -> None:
        self.target = parse_ssh(url)
        self.url = f"ssh://{self.target.destination}:{self.target.port}"
        exe = shutil.which(ssh)
        if exe is None:
            raise TunnelError(f"'{ssh}' not found: install an OpenSSH client to watch ssh:// runs")
        if forward not in ("auto", "unix", "tcp"):
            raise ValueError(f"forward must be 'auto', 'unix' or 'tcp', not {forward!r}")
        self.local_dir: Path | None = None  # the unix sockets' private directory
        self.local_port: int | None = None  # the TCP fallback's port pair
        self.timeout = timeout
        self.restarts = 0
        self.down_reason = ""  # why ssh is down, while it is
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._warnings: deque[str] = deque(maxlen=50)
        self._err: deque[str] = deque(maxlen=20)  # ssh's last stderr lines
        self._base = [
            exe,
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=2",
        ]
        self._tail = (["-p", str(ssh_port)] if ssh_port else []) + [
            *extra_args,
            "--",
            self.target.destination,  # never an option
        ]
        use_unix = forward == "unix" or (forward == "auto" and unix_supported())
        error = self._start_unix(forward == "unix") if use_unix else ""
        if not use_unix or self.local_dir is None:
            error = self._start_tcp()
        if error:
            remove_private_dir(self.local_dir)
            raise TunnelError(error)
        with _OPEN_LOCK:
            _OPEN[self.endpoint.pub] = self
        self._thread: threading.Thread | None = None
        if supervise:
            self._thread = threading.Thread(target=self._supervise, daemon=True, name="ssh-tunnel")
            self._thread.start()

    # ------------------------------------------------------------------ the local end

    @property
    def _local(self) -> Path | int:
        if self.local_dir is not None:
            return self.local_dir
        assert self.local_port is not None
        return self.local_port

    def _start_unix(self, required: bool) -> str:
        """Start ssh forwarding to unix sockets; '' when up, else why not. An ssh that refuses
        the socket forward leaves :attr:`local_dir` None (the TCP fallback is tried) unless
        ``required``."""
        try:
            self.local_dir = make_private_dir()
        except OSError as exc:
            if required:
                return f"no private directory for the tunnel's unix sockets: {exc}"
            return ""
        self.cmd = [*self._base, *forward_specs(self.local_dir, self.target.port), *self._tail]
        self._spawn()
        error = self._wait_up(self.timeout)
        if error:
            self._end()
            if not required and refused_unix_forward(error):
                remove_private_dir(self.local_dir)
                self.local_dir = None
                return ""
        return error

    def _start_tcp(self) -> str:
        """Start ssh forwarding to a local TCP port pair; '' when up, else why not."""
        self.local_port = free_port_pair()
        self.cmd = [*self._base, *forward_specs(self.local_port, self.target.port), *self._tail]
        self._spawn()
        error = self._wait_up(self.timeout)
        if error:
            self._end()
        else:
            self._warn(
                f"{self.url}: {TCP_FALLBACK_NOTE} ({self.local_port}, {self.local_port + 1})"
            )
        return error

    # ------------------------------------------------------------------ one ssh process

    def _spawn(self) -> None:
        self._err.clear()
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        threading.Thread(target=self._drain, args=(self.proc,), daemon=True).start()

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        """Read ssh's stderr to its end, keeping the last lines (never let the pipe fill)."""
        if proc.stderr is None:
            return
        with contextlib.suppress(OSError, ValueError):
            for line in proc.stderr:
                text = line.decode(errors="replace").strip()
                if text:
                    self._err.append(text)

    def _said(self, proc: subprocess.Popen[bytes]) -> str:
        """ssh's last words once it has exited (waits briefly for its stderr's end)."""
        time.sleep(0.05)
        lines = [x for x in self._err if not x.startswith(("Warning: Permanently added",))]
        return "; ".join(lines[-3:]) if lines else "no message"

    def _wait_up(self, timeout: float) -> str:
        """Wait for the local end to answer; '' when up, else why not."""
        deadline = time.monotonic() + timeout
        while not self._stop.is_set():
            if self.proc.poll() is not None:
                return (
                    f"ssh to {self.target.destination} failed (exit {self.proc.returncode}): "
                    f"{self._said(self.proc)}"
                )
            if answers(self._local):
                return ""
            if time.monotonic() > deadline:
                return f"ssh tunnel to {self.target.destination} not up after {timeout:.0f} s"
            time.sleep(0.1)
        return "closed"

    def _end(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr:
            with contextlib.suppress(OSError):
                self.proc.stderr.close()

    def _ports_taken(self) -> int | None:
        """The first of the local port pair some other process holds now, else None (always
        None for unix sockets: nobody else can enter their directory)."""
        if self.local_port is None:
            return None
        for port in (self.local_port, self.local_port + 1):
            with socket.socket() as s:
                # as ssh binds it: a port in TIME_WAIT has no owner
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    return port
        return None

    # ------------------------------------------------------------------ supervision

    def _warn(self, text: str) -> None:
        with self._lock:
            self._warnings.append(text)

    def take_warnings(self) -> list[str]:
        """What the tunnel said since the last call, oldest first (at most the last 50)."""
        with self._lock:
            out = list(self._warnings)
            self._warnings.clear()
        return out

    def _supervise(self) -> None:
        """Start ssh again whenever it exits: after 1 s, doubling up to 30 s while it keeps
        failing; a local port taken by another process is looked at every second (ssh is not
        started meanwhile). Each new reason is said once."""
        failures, up_since = 0, time.monotonic()
        while not self._stop.is_set():
            if self.proc.poll() is None:
                self._stop.wait(0.2)
                continue
            if time.monotonic() - up_since > CALM:
                failures = 0
            why = f"ssh exited ({self.proc.returncode}): {self._said(self.proc)}"
            self._end()
            said, delay = "", min(MAX_DELAY, FIRST_DELAY * 2**failures)
            while True:
                self.down_reason = why
                if why != said:
                    self._warn(f"{self.url}: {why}; connecting again in {delay:.0f} s")
                    said = why
                if self._stop.wait(delay):
                    return
                if self.local_dir is not None:
                    try:
                        ensure_private(self.local_dir)
                    except OSError as exc:  # made again by someone else, or unmakeable
                        why = f"the tunnel's socket directory is not ours or not private: {exc}"
                        self._stop.set()
                        self.down_reason = why
                        self._warn(f"{self.url}: {why}; giving up (start the monitor again)")
                        return
                taken = self._ports_taken()
                if taken is not None:
                    why = f"local port {taken} taken by another process; waiting for it"
                    delay = FIRST_DELAY
                    continue
                self._spawn()
                error = self._wait_up(self.timeout)
                if not error:
                    break
                self._end()
                if self._stop.is_set():
                    return
                why, failures = error, failures + 1
                delay = min(MAX_DELAY, FIRST_DELAY * 2**failures)
            self.restarts += 1
            self.down_reason = ""
            up_since = time.monotonic()
            self._warn(f"{self.url}: ssh tunnel is up again")

    @property
    def endpoint(self) -> Endpoint:
        """The local end of the tunnel (``ipc://`` unix sockets, or the TCP fallback's port)."""
        if self.local_dir is not None:
            return UnixEndpoint("127.0.0.1", 0, str(self.local_dir))
        assert self.local_port is not None
        return Endpoint("127.0.0.1", self.local_port)

    def close(self) -> None:
        """Stop supervising and end ssh."""
        self._stop.set()
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(10)
        with _OPEN_LOCK:
            if _OPEN.get(self.endpoint.pub) is self:
                del _OPEN[self.endpoint.pub]
        if getattr(self, "proc", None) is not None:
            self._end()
        remove_private_dir(self.local_dir)

    def __enter__(self) -> Tunnel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
