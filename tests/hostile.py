"""Hostile peers for the adversarial tests: raw ZMTP frames, memory sampling."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00")
GIB = 1 << 30
CHUNK = b"\x00" * (1 << 20)


def _ready(socket_type: str) -> bytes:
    name, value = b"Socket-Type", socket_type.encode()
    body = b"\x05READY" + bytes([len(name)]) + name + len(value).to_bytes(4, "big") + value
    return bytes([0x04, len(body)]) + body  # a short command frame


def _greet(sock: socket.socket, socket_type: str, as_server: bool) -> None:
    sock.sendall(GREETING + (b"\x01" if as_server else b"\x00") + b"\x00" * 31)
    sock.sendall(_ready(socket_type))
    sock.settimeout(5)
    with contextlib.suppress(OSError):
        sock.recv(64)  # the peer's greeting (not needed, but a polite peer reads it)


def send_huge_frame(sock: socket.socket, size: int = GIB, first: bytes = b"") -> int:
    """Announce one frame of ``size`` bytes and stream it; return the bytes the peer took.

    A receiver with ``ZMQ_MAXMSGSIZE`` below ``size`` hangs up after the 9-byte frame header,
    so the stream stops early with a reset; one without it allocates ``size`` bytes.
    """
    sock.settimeout(10)
    sent = 0
    try:
        sock.sendall(b"\x02" + size.to_bytes(8, "big") + first)  # long frame, last part
        sent = len(first)
        while sent < size:
            n = min(len(CHUNK), size - sent)
            sock.sendall(CHUNK[:n])
            sent += n
    except OSError:
        pass
    return sent


def attack_connect(host: str, port: int, socket_type: str, size: int = GIB) -> int:
    """Connect to a bound stiffmon socket as ``socket_type`` and send one ``size``-byte frame."""
    with socket.create_connection((host, port), timeout=5) as sock:
        _greet(sock, socket_type, as_server=False)
        first = b"\x01" if socket_type in ("SUB", "XSUB") else b""  # a subscription
        return send_huge_frame(sock, size, first)


class Listener:
    """Listen on a port as ``socket_type``; every peer that connects is sent one huge frame."""

    def __init__(self, socket_type: str, size: int = GIB, port: int = 0) -> None:
        self.socket_type = socket_type
        self.size = size
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", port))
        self.server.listen(4)
        self.port = int(self.server.getsockname()[1])
        self.sent: list[int] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.server.settimeout(15)
        with contextlib.suppress(OSError):
            conn, _ = self.server.accept()
            with conn:
                _greet(conn, self.socket_type, as_server=True)
                self.sent.append(send_huge_frame(conn, self.size))

    def wait(self, timeout: float = 30.0) -> int:
        self._thread.join(timeout)
        self.server.close()
        return self.sent[0] if self.sent else -1


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), from /proc."""
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class PeakRss:
    """Sample a process's RSS every ``interval`` seconds in a thread; ``peak`` is the maximum."""

    def __init__(self, pid: int | None = None, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.start = rss_bytes(pid)
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, RuntimeError):
                self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(self.interval)

    @property
    def growth(self) -> int:
        return self.peak - self.start

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(self.interval * 3)
        self._stop.set()
        self._thread.join(5)
