"""Connecting again to the addresses libzmq gives up on.

libzmq reconnects a connecting socket by itself after a connection error, but never after a
protocol error: a peer that sent a frame over ``ZMQ_MAXMSGSIZE`` (or broke ZMTP) is dropped for
good, and the address stays silent for the life of the socket (zeromq/libzmq#4196). The socket's
monitor events tell the two apart: libzmq follows a ``DISCONNECTED`` that it will retry with a
``CONNECT_RETRIED`` at once (measured: within a millisecond, from the same I/O thread call);
after a protocol error nothing follows. :class:`Links` watches a socket's events and, for an
address left without a retry, disconnects and connects it again: after half a second the first
time, then after twice as long each time it happens again (up to 30 s; the count restarts after a
calm minute), so a peer that sends a bad frame on every connection costs one connection per wait,
never a busy loop. Events are read as they come (the monitor's queue is bounded by libzmq).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import parse_monitor_message

EVENTS = (
    zmq.EVENT_DISCONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
)
GRACE = 0.25
"""Seconds a ``DISCONNECTED`` waits for libzmq's own ``CONNECT_RETRIED`` before it counts as
given up (the two are sent back to back; this only absorbs a descheduled I/O thread)."""
FIRST_DELAY = 0.5
MAX_DELAY = 30.0
CALM = 60.0
"""Seconds without a drop after which the wait starts from :data:`FIRST_DELAY` again."""
MAX_EVENTS = 10_000
"""Most monitor events taken in one :meth:`Links.read` (the rest wait for the next)."""


@dataclass
class _Link:
    handshakes: int = 0
    down: bool = False  # disconnected, no handshake since (the peer or the path is gone)
    dropped: float | None = None  # when libzmq dropped it, no retry seen (yet)
    broke_handshake: bool = False
    due: float | None = None  # when to connect again
    failures: int = 0
    last_drop: float = -math.inf


class Links:
    """The addresses one connecting socket connects to, and whether libzmq gave any up.

    Args:
        sock: The socket (SUB, XSUB, DEALER …); connect it only after :meth:`add`.
        warn: Called with a sentence when an address is dropped and will be connected again.
        before_disconnect: Called before the socket is disconnected from an address (to read
            what it has: libzmq aborts when a message it has begun to read loses its pipe).
    """

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        warn: Callable[[str], None],
        before_disconnect: Callable[[], None] | None = None,
    ) -> None:
        self.sock = sock
        self.warn = warn
        self.before_disconnect = before_disconnect
        self.monitor: zmq.Socket[bytes] = sock.get_monitor_socket(EVENTS)
        self.monitor.setsockopt(zmq.LINGER, 0)
        self.reconnects = 0
        self._links: dict[str, _Link] = {}

    def add(self, address: str) -> None:
        """Watch ``address`` (the exact string the socket connects to: libzmq's events name it)."""
        self._links.setdefault(address, _Link())

    def remove(self, address: str) -> None:
        """Stop watching ``address`` (disconnect the socket from it first)."""
        self._links.pop(address, None)

    def read(self, now: float) -> list[str]:
        """Take in the monitor's events; return the addresses whose connection came back (a
        handshake after the first: what was published meanwhile is lost to this socket)."""
        back: list[str] = []
        for _ in range(MAX_EVENTS):
            try:
                frames = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                event = parse_monitor_message(frames)
            except (RuntimeError, ValueError):
                continue
            address = bytes(event["endpoint"]).decode("utf-8", "replace")
            link = self._links.get(address)
            if link is None:
                continue
            kind = event["event"]
            if kind == zmq.EVENT_DISCONNECTED:
                link.dropped = now
                link.down = True
            elif kind == zmq.EVENT_CONNECT_RETRIED:  # libzmq goes on by itself
                link.dropped = None
                link.broke_handshake = False
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                link.broke_handshake = True
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                link.handshakes += 1
                link.down = False
                link.broke_handshake = False
                if link.handshakes > 1:
                    back.append(address)
        return back

    def tick(self, now: float) -> list[str]:
        """Schedule the addresses given up, connect again those whose wait is over; return the
        addresses connected again now."""
        again: list[str] = []
        for address, link in self._links.items():
            if link.dropped is not None and now - link.dropped >= GRACE:
                if link.dropped - link.last_drop > CALM:
                    link.failures = 0
                delay = min(MAX_DELAY, FIRST_DELAY * 2**link.failures)
                link.failures += 1
                link.last_drop = link.dropped
                link.due = link.dropped + delay
                link.dropped = None
                why = (
                    "broke the handshake (not a stiffmon peer?)"
                    if link.broke_handshake
                    else "sent an oversized (or malformed) frame"
                )
                self.warn(f"{address} {why}: dropped; reconnecting in {delay:g} s")
            if link.due is not None and now >= link.due:
                link.due = None
                if self.before_disconnect is not None:
                    self.before_disconnect()
                with contextlib.suppress(zmq.ZMQError):  # gone from the socket's endpoints
                    self.sock.disconnect(address)
                self.sock.connect(address)
                self.reconnects += 1
                again.append(address)
        return again

    def down(self) -> set[str]:
        """The addresses whose connection was lost and is not back (as of the last :meth:`read`)."""
        return {address for address, link in self._links.items() if link.down}

    def wait(self, now: float) -> float:
        """Seconds until :meth:`tick` has something to do (``math.inf``: nothing pending)."""
        soonest = math.inf
        for link in self._links.values():
            if link.dropped is not None:
                soonest = min(soonest, link.dropped + GRACE - now)
            if link.due is not None:
                soonest = min(soonest, link.due - now)
        return max(0.0, soonest)

    def close(self) -> None:
        """Stop monitoring (before the socket is closed)."""
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.monitor.close(0)
