"""A forked child keeps none of the agent's TCP sockets.

``fork`` (Linux's default for DataLoader workers and ``multiprocessing``) copies every open file
descriptor, the agent's listening sockets and its monitors' connections among them; the child
never uses them (libzmq's threads are not copied), but while it lives the ports stay bound and
the connections open. After a ``kill -9`` of the training process a monitor then sees a quiet
connection ("stalled") instead of a lost one ("disconnected"), and for a long-lived helper
process for as long as it runs. So right after a fork the child closes its copies of every TCP
socket on the agent's ports (listening or accepted: both have the port as their local one). The
parent's sockets are not touched: each process closes its own copy of a descriptor.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading

_ports: dict[int, int] = {}  # port -> holders (publishers that bound it)
_lock = threading.Lock()


def hold(*ports: int) -> None:
    """The agent has bound ``ports``: a forked child closes its copies of their sockets."""
    with _lock:
        for port in ports:
            _ports[port] = _ports.get(port, 0) + 1


def release(*ports: int) -> None:
    """The agent closed ``ports`` (each as often as :func:`hold` took it)."""
    with _lock:
        for port in ports:
            if _ports.get(port, 0) <= 1:
                _ports.pop(port, None)
            else:
                _ports[port] -= 1


def close_inherited(ports: set[int] | None = None, fd_dir: str = "/proc/self/fd") -> int:
    """Close this process's TCP sockets whose local port is one of ``ports`` (default: the held
    ones); how many were closed. Linux only (``/proc``); elsewhere nothing is closed."""
    ports = set(_ports) if ports is None else ports
    if not ports:
        return 0
    try:
        fds = [int(name) for name in os.listdir(fd_dir)]
    except (OSError, ValueError):
        return 0
    closed = 0
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)  # OSError: not a socket (or already closed)
        except OSError:
            continue
        try:
            mine = (
                sock.family in (socket.AF_INET, socket.AF_INET6)
                and sock.type == socket.SOCK_STREAM
                and sock.getsockname()[1] in ports
            )
        except OSError:
            mine = False
        if mine:
            sock.close()
            closed += 1
        else:
            sock.detach()  # not ours: left open
    return closed


def _in_child() -> None:
    global _lock
    _lock = threading.Lock()  # a copy taken mid-hold() in another thread would stay locked
    with contextlib.suppress(Exception):  # never let this break the user's fork
        close_inherited()
    _ports.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_child)
