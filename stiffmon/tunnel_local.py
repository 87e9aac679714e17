"""The local end of an ssh tunnel: unix sockets in a private directory, or (the fallback) TCP.

A local TCP port is free for anyone on the machine to take: between an ssh that exits and the
one started again, another user's process can bind the tunnel's port, and a ZeroMQ socket that
connects to it by itself (libzmq reconnects every 100 ms) would be talking to a stranger. So the
tunnel forwards to unix sockets instead (``ssh -L /dir/pub.sock:127.0.0.1:PORT``, OpenSSH 6.7+),
in a directory made by :func:`tempfile.mkdtemp` (mode 0700, owned by us: no other user can
connect to, remove or create anything in it), and ZeroMQ connects to ``ipc:///dir/pub.sock``.
ssh's ``StreamLocalBindUnlink=yes`` lets a restarted ssh replace the socket files its dead
predecessor left. Where unix sockets cannot be used (no ``AF_UNIX`` or no ZeroMQ ``ipc``:
Windows; an ssh that refuses the socket forward) the tunnel falls back to local TCP ports and
says that other local users could take them while ssh is down.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stiffmon.transport import Endpoint

PUB_SOCK = "pub.sock"
SNAP_SOCK = "snap.sock"
MAX_PATH = 100
"""Longest socket path used (``sun_path`` holds 108 bytes on Linux, 104 on macOS)."""
TCP_FALLBACK_NOTE = (
    "unix-socket forwards not available here: the tunnel uses local TCP ports, which another "
    "local user could take while ssh is restarting"
)


@dataclass(frozen=True)
class UnixEndpoint(Endpoint):
    """A tunnel's local end as two unix sockets in ``directory`` (``host``/``port`` are
    ``127.0.0.1:0``: anything that would make a TCP address of them fails loudly)."""

    directory: str = ""

    @property
    def pub(self) -> str:
        """ZeroMQ address of the update stream (``ipc://``)."""
        return f"ipc://{self.directory}/{PUB_SOCK}"

    @property
    def snapshot(self) -> str:
        """ZeroMQ address of the snapshot service (``ipc://``)."""
        return f"ipc://{self.directory}/{SNAP_SOCK}"

    def __str__(self) -> str:
        return self.pub


def unix_supported() -> bool:
    """Whether this Python and this libzmq can use unix sockets (not on Windows)."""
    if os.name == "nt" or not hasattr(socket, "AF_UNIX"):
        return False
    try:
        import zmq

        return bool(zmq.has("ipc"))
    except Exception:  # pragma: no cover - a broken pyzmq fails elsewhere first
        return False


def make_private_dir() -> Path:
    """A fresh directory only we can enter (0700), short enough for socket paths.

    Raises:
        OSError: It could not be made private (then unix sockets are not used).
    """
    base: str | None = None
    if len(tempfile.gettempdir()) + 40 > MAX_PATH and os.path.isdir("/tmp"):
        base = "/tmp"  # macOS's $TMPDIR can be long
    path = Path(tempfile.mkdtemp(prefix="stiffmon-ssh-", dir=base))
    check_private(path)
    return path


def check_private(path: Path) -> None:
    """Raise :class:`OSError` unless ``path`` is a real directory of ours with mode 0700."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{path} is not a directory")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise OSError(f"{path} is owned by uid {st.st_uid}, not us")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise OSError(f"{path} has mode {stat.S_IMODE(st.st_mode):o}, not 0700")


def ensure_private(path: Path) -> None:
    """Make ``path`` again (0700) if it is gone (a cleaner of the temporary directory removed
    it while ssh was down), then check it is ours and private.

    Raises:
        OSError: It exists and is not ours or not private (someone else made it meanwhile: the
            tunnel must not listen there), or it cannot be made.
    """
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # whatever the umask
    except FileExistsError:
        pass
    check_private(path)


def remove_private_dir(path: Path | None) -> None:
    """Remove the directory and the socket files in it."""
    if path is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(path)


def forward_specs(local: Path | int, remote_port: int) -> list[str]:
    """ssh's ``-L`` arguments: the update port and the snapshot port (``remote_port + 1``); for
    unix sockets ``StreamLocalBindUnlink=yes`` first, so that a restarted ssh replaces the socket
    files its killed predecessor left (only there: an OpenSSH older than 6.7 refuses the option,
    and must still get the TCP fallback)."""
    out: list[str] = []
    if isinstance(local, int):
        pairs = [(f"127.0.0.1:{local}", remote_port), (f"127.0.0.1:{local + 1}", remote_port + 1)]
    else:
        pairs = [(str(local / PUB_SOCK), remote_port), (str(local / SNAP_SOCK), remote_port + 1)]
        out += ["-o", "StreamLocalBindUnlink=yes"]
    for here, there in pairs:
        out += ["-L", f"{here}:127.0.0.1:{there}"]
    return out


def answers(local: Path | int) -> bool:
    """Whether the local end (a directory's update socket, or a TCP port) accepts a connection."""
    if isinstance(local, int):
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex(("127.0.0.1", local)) == 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as u:
        u.settimeout(0.2)
        return u.connect_ex(str(local / PUB_SOCK)) == 0


def refused_unix_forward(said: str) -> bool:
    """Whether ssh's words say it cannot forward to a unix socket (an OpenSSH older than 6.7,
    or a client without it): then the TCP fallback is worth a try."""
    low = said.lower()
    return "bad local forwarding specification" in low or (
        "bad configuration option" in low and "streamlocalbindunlink" in low
    )
