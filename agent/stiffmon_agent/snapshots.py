"""Bounded snapshot serving on the agent's ROUTER socket (DESIGN §4, the Clone pattern).

A monitor asks for the run's history with ``[SNAPSHOT_REQUEST, header]``; the answer is every
message of the history, one ``SNAPSHOT_END`` with the last ``seq`` the history covers and a
``SNAPSHOT_DONE``. Serving it must never cost the training process memory or time without bound,
whatever the peer does:

* the ROUTER has a finite send high-water mark and ``ROUTER_MANDATORY``: a send that would go
  beyond a peer's queue fails at once (``EAGAIN``) instead of queueing without limit;
* a peer has at most one snapshot outstanding; its repeat requests coalesce into it, and one
  that comes within ``min_interval`` (0.5 s) of the start of its last snapshot waits until then
  (a flood of requests from a peer costs the publisher thread two snapshots a second, not one
  per request);
* the publisher thread calls :meth:`SnapshotServer.pump` between drains of its queue and each
  call sends at most ``slice_messages`` per peer, so live publishing and recording never wait
  for a snapshot;
* a peer whose queue stays full (it does not read) for ``stall_timeout`` seconds is dropped and
  its requests are ignored for ``ban_seconds``; at most ``max_peers`` snapshots are served at once.

The server only sees the history as a list of already-encoded frame lists (a cut taken when the
request arrives), so how the publisher stores its history is its own business.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from stiffmon.transport import (
    SNAPSHOT_DONE,
    SNAPSHOT_END,
    SNAPSHOT_MESSAGE,
    SNAPSHOT_REQUEST,
    encode_control,
    takes_first_seq_order,
)

Frames = list[bytes]
Cut = Callable[[bool], tuple[list[Frames], int]]
"""Given whether the peer takes first-``seq`` order (:func:`~stiffmon.transport.snapshot_request`),
returns (encoded messages of the history, oldest first; the last seq the history covers)."""

SNDHWM = 1000
"""Messages queued per snapshot peer at most (each a small encoded message)."""


@dataclass
class SnapshotStats:
    """Counters, for tests and the agent's diagnostics."""

    served: int = 0
    coalesced: int = 0
    refused: int = 0
    dropped_peers: int = 0
    ignored: int = 0
    deferred: int = 0


@dataclass
class _Peer:
    ident: bytes
    todo: list[Frames]
    tail: list[Frames]  # the end and done markers, sent after the history
    pos: int = 0
    last_progress: float = field(default_factory=time.monotonic)


class SnapshotServer:
    """Serve snapshot requests arriving on ``router`` from ``cut()``, in bounded slices.

    Args:
        router: A bound ROUTER socket; :func:`configure` it first.
        run: The run id (for the end marker).
        cut: The history at the moment of a request (see :data:`Cut`).
        slice_messages: Messages sent per peer per :meth:`pump`.
        stall_timeout: Seconds a peer may leave its queue full before it is dropped.
        ban_seconds: How long a dropped peer's requests are ignored.
        max_peers: Snapshots served at the same time; more requests are refused (ignored).
        min_interval: Seconds between the starts of two snapshots for one peer.
    """

    def __init__(
        self,
        router: zmq.Socket[bytes],
        run: str,
        cut: Cut,
        *,
        slice_messages: int = 1000,
        stall_timeout: float = 5.0,
        ban_seconds: float = 30.0,
        max_peers: int = 8,
        min_interval: float = 0.5,
    ) -> None:
        self.router = router
        self.run = run
        self.cut = cut
        self.slice_messages = slice_messages
        self.stall_timeout = stall_timeout
        self.ban_seconds = ban_seconds
        self.max_peers = max_peers
        self.min_interval = min_interval
        self.stats = SnapshotStats()
        self._started: dict[bytes, float] = {}  # when each peer's last snapshot started
        self._waiting: dict[bytes, tuple[float, bool]] = {}  # deferred: when it may start, order
        self._peers: dict[bytes, _Peer] = {}
        self._banned: dict[bytes, float] = {}
        self._host = socket.gethostname()

    @staticmethod
    def configure(router: zmq.Socket[bytes]) -> None:
        """Socket options the server relies on (set before binding)."""
        router.setsockopt(zmq.SNDHWM, SNDHWM)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full peer queue is EAGAIN, not a drop

    @property
    def busy(self) -> bool:
        """Whether a peer took messages in the last 0.2 s (the publisher then polls more often;
        a peer that does not read is only retried at the publisher's normal pace)."""
        now = time.monotonic()
        return any(now - peer.last_progress < 0.2 for peer in self._peers.values())

    def read_requests(self, limit: int = 1000) -> None:
        """Take the requests waiting on the socket (at most ``limit``); never blocks."""
        now = time.monotonic()
        for _ in range(limit):
            try:  # EVENTS first: raising zmq.Again per empty read costs more on a cold thread
                if not self.router.get(zmq.EVENTS) & zmq.POLLIN:
                    return
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:  # zmq.Again included
                return
            if len(frames) < 2 or frames[1] != SNAPSHOT_REQUEST:
                self.stats.ignored += 1  # not for us: ignore, never crash
                continue
            self._request(frames[0], now, takes_first_seq_order(frames[2:]))

    def _request(self, ident: bytes, now: float, first_seq: bool) -> None:
        until = self._banned.get(ident)
        if until is not None:
            if now < until:
                self.stats.ignored += 1
                return
            del self._banned[ident]
        if ident in self._peers or ident in self._waiting:
            self.stats.coalesced += 1  # the snapshot under way (or waiting) answers this one too
            return
        last = self._started.get(ident)
        if last is not None and now - last < self.min_interval:
            self._waiting[ident] = (last + self.min_interval, first_seq)
            self.stats.deferred += 1
            return
        if len(self._peers) >= self.max_peers:
            self.stats.refused += 1
            return
        todo, seq = self.cut(first_seq)
        tail = [
            encode_control(SNAPSHOT_END, {"run": self.run, "seq": seq}),
            encode_control(SNAPSHOT_DONE, {"runs": 1, "host": self._host}),
        ]
        self._peers[ident] = _Peer(ident, todo, tail, last_progress=now)
        self._started[ident] = now

    def pump(self) -> bool:
        """Send the next slice to every peer; True if some peer took messages (more may follow)."""
        now = time.monotonic()
        for ident, (when, first_seq) in list(self._waiting.items()):
            if when <= now:
                del self._waiting[ident]
                self._request(ident, now, first_seq)
        for ident, when in list(self._started.items()):
            if now - when >= self.min_interval:
                del self._started[ident]
        if not self._peers:
            return False
        progressed = False
        for ident, peer in list(self._peers.items()):
            sent, state = self._send_slice(peer)
            if sent:
                progressed = True
                peer.last_progress = now
            if state == "done":
                del self._peers[ident]
                self.stats.served += 1
            elif state == "gone":
                del self._peers[ident]
            elif now - peer.last_progress > self.stall_timeout:
                del self._peers[ident]  # a peer that does not read: its queue stays bounded
                self._banned[ident] = now + self.ban_seconds
                self.stats.dropped_peers += 1
        for ident, until in list(self._banned.items()):
            if until < now:
                del self._banned[ident]
        return progressed

    def _send_slice(self, peer: _Peer) -> tuple[int, str]:
        sent = 0
        total = len(peer.todo) + len(peer.tail)
        while sent < self.slice_messages and peer.pos < total:
            if peer.pos < len(peer.todo):
                frames = [peer.ident, SNAPSHOT_MESSAGE, *peer.todo[peer.pos]]
            else:
                frames = [peer.ident, *peer.tail[peer.pos - len(peer.todo)]]
            try:
                self.router.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return sent, "full"
            except zmq.ZMQError:  # EHOSTUNREACH: the peer went away
                return sent, "gone"
            peer.pos += 1
            sent += 1
        return sent, ("done" if peer.pos >= total else "more")

    def drop_all(self) -> None:
        """Forget every snapshot under way (the publisher is closing)."""
        self._peers.clear()
        self._waiting.clear()
