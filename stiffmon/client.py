"""Monitor-side client: subscribe to live runs, back-fill their history, never crash on bad input.

Late join follows the ZeroMQ guide's Clone pattern (DESIGN §4): subscribe first, then ask each
endpoint's snapshot service for the history; apply snapshot messages, then live updates whose
``seq`` is above the snapshot's. A snapshot is not in ``seq`` order (the agent's history joins
many messages into chunks whose ``seq`` ranges interleave), so while its messages for a run
arrive, what is new is judged against what the client had when they started, and the run's live
messages wait. A history chunk that joins many batches (``columns`` with ``batch_seqs``) is
trimmed to the batches the client does not have yet. A gap in a run's ``seq``
(a slow subscriber lost messages at the publisher's high-water mark) or a run never seen before
(an agent restarted) triggers a new snapshot; messages that arrive meanwhile wait in a buffer, so
every run's messages come out once, in ``seq`` order. Malformed frames are counted and dropped.

An address whose peer sent a frame over the size limit is dropped by libzmq for good; the client
connects to it again (:mod:`stiffmon.reconnect`), says so in :attr:`ClientStats.warnings`, and asks
for a snapshot whenever a live connection comes back, so no message is lost from its view.
A snapshot request left unanswered past the timeout is asked again; a late answer to the old
one still counts for what it brings, but no end marker moves a run back past what was delivered.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import zmq

from stiffmon import protocol as p
from stiffmon.reconnect import Links
from stiffmon.transport import (
    MAX_DATA_FRAME_BYTES,
    SNAPSHOT_DONE,
    SNAPSHOT_END,
    SNAPSHOT_MESSAGE,
    CurveKeys,
    Endpoint,
    decode_control,
    limit_frames,
    parse_endpoint,
    snapshot_request,
)

Received = tuple[p.AnyMessage, list[bytes]]


@dataclass
class ClientStats:
    """Counters for the status line."""

    received: int = 0
    malformed: int = 0
    duplicates: int = 0
    gaps: int = 0
    snapshots: int = 0
    snapshot_timeouts: int = 0
    reconnects: int = 0  # connections libzmq gave up (an oversized frame) and the client remade
    last_error: str = ""
    warnings: deque[str] = field(default_factory=lambda: deque(maxlen=20))  # newest last


@dataclass
class _EndpointState:
    endpoint: Endpoint
    dealer: zmq.Socket[bytes]
    pending_since: float | None = None
    wanted: bool = True  # a snapshot should be requested as soon as possible
    last_request: float = 0.0


@dataclass
class _RunState:
    last_seq: int = -1  # every message up to here is delivered (while a snapshot arrives: had)
    syncing: bool = True  # live messages wait in ``buffer``
    buffer: list[Received] = field(default_factory=list)
    in_snapshot: bool = False  # a snapshot's messages for the run are arriving
    was_live: bool = False  # ... and the run was live when they started
    snapshot_top: int = -1  # the highest seq they delivered
    delivered: int = -1  # the highest seq ever delivered


class Client:
    """Subscribe to one or many agents (or relays) and yield their messages in order.

    Args:
        endpoints: ``tcp://host:port`` addresses (strings or :class:`Endpoint`).
        curve: Client CURVE keys, for agents that require authentication.
        snapshot_timeout: Seconds to wait for a snapshot (for its next frame, once it comes)
            before asking again.
        max_buffer: Live messages buffered per run while a snapshot is pending.
        max_seq_jump: A live message whose ``seq`` is further than this beyond what the client
            has of its run is malformed (forged or corrupt), not the run's new position: it is
            counted and dropped, and a snapshot, whose end marker is the authority on a run's
            ``seq``, is asked for in case the run really did move on.
        context: ZeroMQ context (default: a private one).
    """

    def __init__(
        self,
        endpoints: Sequence[str | Endpoint],
        *,
        curve: CurveKeys | None = None,
        snapshot_timeout: float = 2.0,
        max_buffer: int = 100_000,
        max_seq_jump: int = 1_000_000,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        self._own_ctx = context is None
        self.ctx: zmq.Context[zmq.Socket[bytes]] = context or zmq.Context()
        self.curve = curve
        self.snapshot_timeout = snapshot_timeout
        self.max_buffer = max_buffer
        self.max_seq_jump = max_seq_jump
        self.stats = ClientStats()
        self.sub = self._socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.RCVHWM, 100_000)
        self.poller = zmq.Poller()
        self.poller.register(self.sub, zmq.POLLIN)
        self._eps: dict[zmq.Socket[bytes], _EndpointState] = {}
        self._runs: dict[str, _RunState] = defaultdict(_RunState)
        self._run_endpoint: dict[str, _EndpointState] = {}
        self._cut: dict[str, str] = {}  # run -> address lost, until the run itself is heard again
        self._warned = self._taken = 0  # warnings made, handed out by take_warnings()
        try:
            self._links = Links(self.sub, self._warn)
            self.poller.register(self._links.monitor, zmq.POLLIN)
            for ep in endpoints:
                self.add_endpoint(ep)
        except BaseException:
            self.close()  # a context left to the garbage collector with open sockets can hang
            raise

    def _socket(self, kind: int) -> zmq.Socket[bytes]:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        limit_frames(s, MAX_DATA_FRAME_BYTES)  # a bigger frame is refused before it is read
        if self.curve is not None:
            s.curve_secretkey = self.curve.secret
            s.curve_publickey = self.curve.public
            s.curve_serverkey = self.curve.server_public
        return s

    @property
    def endpoints(self) -> list[Endpoint]:
        return [st.endpoint for st in self._eps.values()]

    def add_endpoint(self, endpoint: str | Endpoint) -> Endpoint:
        """Connect to another agent or relay; its history is fetched."""
        ep = endpoint if isinstance(endpoint, Endpoint) else parse_endpoint(endpoint)
        self._links.add(ep.pub)
        self.sub.connect(ep.pub)
        dealer = self._dealer(ep)
        self._eps[dealer] = _EndpointState(ep, dealer)
        return ep

    def _dealer(self, ep: Endpoint) -> zmq.Socket[bytes]:
        dealer = self._socket(zmq.DEALER)
        dealer.connect(ep.snapshot)
        self.poller.register(dealer, zmq.POLLIN)
        return dealer

    def _new_dealer(self, st: _EndpointState) -> None:
        """A fresh snapshot socket for ``st`` (libzmq gave the old one's connection up)."""
        self.poller.unregister(st.dealer)
        del self._eps[st.dealer]
        st.dealer.close(0)
        st.dealer = self._dealer(st.endpoint)
        self._eps[st.dealer] = st
        st.pending_since = None
        self.stats.reconnects += 1
        self._warn(f"{st.endpoint.snapshot} dropped the snapshot connection; reconnecting")

    def _warn(self, text: str) -> None:
        self.stats.last_error = text
        self.stats.warnings.append(text)
        self._warned += 1

    def take_warnings(self) -> list[str]:
        """The warnings (connections dropped and made again) since the last call, oldest first
        (at most the last 20)."""
        kept = list(self.stats.warnings)
        new, self._taken = min(self._warned - self._taken, len(kept)), self._warned
        return kept[len(kept) - new :]

    # ------------------------------------------------------------------ snapshots

    def _request(self, st: _EndpointState, now: float) -> None:
        try:
            st.dealer.send_multipart(snapshot_request(), zmq.NOBLOCK)
        except zmq.Again:  # no connection left: libzmq dropped it (an oversized frame?)
            st.last_request = now
            self._new_dealer(st)
            return
        except zmq.ZMQError as exc:
            self.stats.last_error = f"snapshot request to {st.endpoint}: {exc}"
            return
        st.pending_since = now
        st.wanted = False
        st.last_request = now

    def _want_all(self) -> None:
        for st in self._eps.values():
            st.wanted = True

    def _on_snapshot(self, st: _EndpointState, frames: list[bytes], out: list[Received]) -> None:
        tag = frames[0] if frames else b""
        if tag == SNAPSHOT_MESSAGE:
            msg = self._decode(frames[1:])
            if msg is None:
                return
            self._run_endpoint[msg.run] = st
            rs = self._runs[msg.run]
            if not rs.in_snapshot:  # its live messages wait until the snapshot's are out
                rs.in_snapshot, rs.was_live, rs.snapshot_top = True, not rs.syncing, -1
                rs.syncing = True
            if msg.seq <= rs.last_seq:  # had before the snapshot (its order is not seq order)
                self.stats.duplicates += 1
                return
            body = frames[1:]
            if isinstance(msg, p.Columns):  # a history chunk: only the batches not yet had
                rest = msg.after(rs.last_seq)
                if rest is not msg and rest is not None:
                    msg, body = rest, p.encode(rest)
            rs.snapshot_top = max(rs.snapshot_top, msg.seq)
            rs.delivered = max(rs.delivered, msg.seq)
            out.append((msg, body))
        elif tag == SNAPSHOT_END and len(frames) >= 2:
            info = decode_control(frames[1])
            run, seq = info.get("run"), info.get("seq")
            if isinstance(run, str) and isinstance(seq, int) and not isinstance(seq, bool):
                self._run_endpoint[run] = st
                rs = self._runs[run]
                if rs.syncing and not rs.was_live:  # the snapshot is the authority on where
                    rs.last_seq = max(seq, rs.delivered)  # the run is (a late one: not behind)
                else:  # a run that was live only moves forward
                    rs.last_seq = max(rs.last_seq, seq, rs.snapshot_top)
                self._end_snapshot(rs)
                self._flush(run, out)
        elif tag == SNAPSHOT_DONE:
            st.pending_since = None
            self.stats.snapshots += 1
            for run, rs in self._runs.items():  # an answer without a run's end marker
                if rs.in_snapshot and self._run_endpoint.get(run) is st:
                    rs.last_seq = max(rs.last_seq, rs.snapshot_top)
                    live = rs.was_live
                    self._end_snapshot(rs)
                    if live:
                        self._flush(run, out)
                    else:
                        rs.syncing = True
            self._release_stuck(out)
        else:
            self.stats.malformed += 1

    @staticmethod
    def _end_snapshot(rs: _RunState) -> None:
        rs.in_snapshot = rs.was_live = rs.syncing = False
        rs.snapshot_top = -1

    def _release_stuck(self, out: list[Received]) -> None:
        """Once no snapshot is pending, runs no snapshot covered go live from what arrived."""
        if any(st.pending_since is not None or st.wanted for st in self._eps.values()):
            return
        for run, rs in self._runs.items():
            if rs.syncing and rs.buffer:
                self._go_live(run, out)

    def _go_live(self, run: str, out: list[Received]) -> None:
        """Stop waiting for a snapshot of ``run``: deliver its buffer from the oldest message."""
        rs = self._runs[run]
        top = rs.snapshot_top
        self._end_snapshot(rs)
        rs.last_seq = max(rs.last_seq, top, min(m.seq for m, _ in rs.buffer) - 1)
        self._flush(run, out)

    def _flush(self, run: str, out: list[Received]) -> None:
        rs = self._runs[run]
        buffered, rs.buffer = sorted(rs.buffer, key=lambda r: r[0].seq), []
        for msg, frames in buffered:
            self._apply_live(msg, frames, out)

    # ------------------------------------------------------------------ live updates

    def _decode(self, frames: list[bytes]) -> p.AnyMessage | None:
        try:
            return p.decode(frames)
        except p.ProtocolError as exc:
            self.stats.malformed += 1
            self.stats.last_error = str(exc)
            return None

    def _apply_live(self, msg: p.AnyMessage, frames: list[bytes], out: list[Received]) -> None:
        rs = self._runs[msg.run]
        if rs.syncing:
            if rs.last_seq >= 0 and msg.seq - rs.last_seq > self.max_seq_jump:
                self.stats.malformed += 1
                self.stats.last_error = f"{msg.run}: seq jumps from {rs.last_seq} to {msg.seq}"
            elif len(rs.buffer) < self.max_buffer:
                rs.buffer.append((msg, frames))
            return
        if msg.seq <= rs.last_seq:
            self.stats.duplicates += 1
            return
        if msg.seq > rs.last_seq + 1:
            self.stats.gaps += 1
            rs.syncing = True
            if rs.last_seq >= 0 and msg.seq - rs.last_seq > self.max_seq_jump:
                self.stats.malformed += 1  # not believed: the snapshot will say
                self.stats.last_error = f"{msg.run}: seq jumps from {rs.last_seq} to {msg.seq}"
            else:
                rs.buffer.append((msg, frames))
            st = self._run_endpoint.get(msg.run)
            if st is not None:
                st.wanted = True
            else:
                self._want_all()
            return
        rs.last_seq = msg.seq
        rs.delivered = max(rs.delivered, msg.seq)
        out.append((msg, frames))

    def _on_live(self, frames: list[bytes], out: list[Received]) -> None:
        msg = self._decode(frames)
        if msg is None:
            return
        self.stats.received += 1
        if msg.run not in self._runs:
            self._runs[msg.run]  # a run never seen: fetch its history first
            self._want_all()
        self._apply_live(msg, frames, out)

    # ------------------------------------------------------------------ public API

    def poll(self, timeout: float = 0.1, max_messages: int = 10_000) -> list[Received]:
        """Wait up to ``timeout`` seconds; return the messages that became available, in order."""
        out: list[Received] = []
        now = time.monotonic()
        self._check_links(now)
        for st in list(self._eps.values()):
            late = st.pending_since is not None and now - st.pending_since > self.snapshot_timeout
            if late and not int(st.dealer.get(zmq.EVENTS)) & zmq.POLLIN:  # none waits unread
                st.pending_since = None
                self.stats.snapshot_timeouts += 1
                # the agent may have died with our request: ask again while runs wait for one
                st.wanted = any(rs.syncing for rs in self._runs.values())
                self._release_stuck(out)
            if st.wanted and st.pending_since is None and now - st.last_request >= 0.5:
                self._request(st, now)
        deadline = now + max(timeout, 0.0)
        while len(out) < max_messages:
            now = time.monotonic()
            remaining = min(max(0.0, deadline - now), self._links.wait(now))
            events = dict(self.poller.poll(int(remaining * 1000) if not out else 0))
            if self._links.monitor in events or self._links.wait(time.monotonic()) == 0.0:
                self._check_links(time.monotonic())
                events.pop(self._links.monitor, None)
            elif not events:
                break
            for sock in events:
                for _ in range(1000):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if sock is self.sub:
                        self._on_live(frames, out)
                    else:
                        self._on_snapshot(self._eps[sock], frames, out)
                answering = self._eps.get(sock)
                if answering is not None and answering.pending_since is not None:
                    answering.pending_since = time.monotonic()  # still coming: not late
        if self._cut:
            for msg, _ in out:
                self._cut.pop(msg.run, None)
        return out

    def _check_links(self, now: float) -> None:
        """Connect again what libzmq gave up; a snapshot for each live connection that came back."""
        back = self._links.read(now)
        again = self._links.tick(now)
        self.stats.reconnects += len(again)
        for st in self._eps.values():
            if st.endpoint.pub in back:
                st.wanted = True

    def cut_off(self) -> dict[str, str]:
        """Runs whose address (agent or relay) lost its connection and that have not been heard
        since: run -> address. The address answering again is not enough: a killed agent's port
        may be taken by another run's agent."""
        if down := self._links.down():
            for r, st in self._run_endpoint.items():
                if st.endpoint.pub in down:
                    self._cut[r] = st.endpoint.pub
        return dict(self._cut)

    def flush_pending(self) -> list[Received]:
        """Give up waiting for snapshots: return every buffered message, per run in seq order."""
        out: list[Received] = []
        for run, rs in self._runs.items():
            if rs.buffer:
                self._go_live(run, out)
        return out

    def close(self) -> None:
        """Close the sockets (and the context if it is ours)."""
        if hasattr(self, "_links"):
            self._links.close()
        self.sub.close(0)
        for st in self._eps.values():
            st.dealer.close(0)
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
