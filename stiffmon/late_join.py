"""Late join: each run's messages once, in ``seq`` order, from a snapshot and the live stream.

The ordering half of :class:`stiffmon.client.Client` (which owns the sockets). It follows the
ZeroMQ guide's Clone pattern (DESIGN §4): apply snapshot messages, then live updates whose
``seq`` is above the snapshot's. A snapshot is not in ``seq`` order (the agent's history joins
many messages into chunks whose ``seq`` ranges interleave), so while its messages for a run
arrive, what is new is judged against what the client had when they started, and the run's live
messages wait. A history chunk that joins many batches (``columns`` with ``batch_seqs``) is
trimmed to the batches the client does not have yet. A gap in a run's ``seq`` (a slow subscriber
lost messages at the publisher's high-water mark) or a run never seen before (an agent
restarted) asks for a new snapshot; messages that arrive meanwhile wait in a buffer. A late
answer to an old snapshot request still counts for what it brings, but no end marker moves a run
back past what was delivered. A relay's answer that says some of its upstreams did not answer
(``missing``: an agent too busy to answer within the relay's timeout) leaves the runs it did not
cover waiting and asks again, up to :data:`INCOMPLETE_RETRIES` answers in a row; only then do
they go live from what arrived, with a warning naming them (their history before is not had).
Malformed frames are counted and dropped, and so are the messages of runs the client does not
take (``accept``: a monitor of the local registry takes registered runs only, not whatever
another process that took a port publishes).
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from stiffmon import protocol as p
from stiffmon.transport import SNAPSHOT_DONE, SNAPSHOT_END, SNAPSHOT_MESSAGE, decode_control

Received = tuple[p.AnyMessage, list[bytes]]

INCOMPLETE_RETRIES = 5
"""Answers in a row, each with upstreams missing, after which the runs left out go live."""


@dataclass
class ClientStats:
    """Counters for the status line."""

    received: int = 0
    malformed: int = 0
    duplicates: int = 0
    gaps: int = 0
    snapshots: int = 0
    snapshot_timeouts: int = 0
    foreign: int = 0  # messages of runs not accepted (not registered), dropped
    reconnects: int = 0  # connections libzmq gave up (an oversized frame) and the client remade
    last_error: str = ""
    warnings: deque[str] = field(default_factory=lambda: deque(maxlen=20))  # newest last


class SnapshotSource(Protocol):
    """What the ordering needs of an endpoint's snapshot service: whether to ask it, and whether
    an answer is awaited."""

    wanted: bool  # a snapshot should be requested as soon as possible
    pending_since: float | None  # when the awaited answer was asked for (or last sent a frame)


S = TypeVar("S", bound=SnapshotSource)


@dataclass
class RunState:
    """Where one run's ordering stands."""

    last_seq: int = -1  # every message up to here is delivered (while a snapshot arrives: had)
    syncing: bool = True  # live messages wait in ``buffer``
    buffer: list[Received] = field(default_factory=list)
    in_snapshot: bool = False  # a snapshot's messages for the run are arriving
    was_live: bool = False  # ... and the run was live when they started
    snapshot_top: int = -1  # the highest seq they delivered
    delivered: int = -1  # the highest seq ever delivered


class LateJoin(Generic[S]):
    """Orders the snapshot and live frames of many runs from many endpoints.

    Args:
        stats: The client's counters (received, malformed, duplicates, gaps, snapshots).
        sources: The endpoints' snapshot services, asked for by gaps and unknown runs.
        max_buffer: Live messages buffered per run while a snapshot is pending.
        max_seq_jump: A live message whose ``seq`` is further than this beyond what the client
            has of its run is malformed, not the run's new position.
        accept: Which runs to take (None: every run); the others' frames are counted in
            :attr:`ClientStats.foreign` and dropped.
    """

    def __init__(
        self,
        stats: ClientStats,
        sources: Callable[[], Iterable[S]],
        *,
        max_buffer: int,
        max_seq_jump: int,
        accept: Callable[[str], bool] | None = None,
    ) -> None:
        self.stats = stats
        self.accept = accept
        self._sources = sources
        self.max_buffer = max_buffer
        self.max_seq_jump = max_seq_jump
        self.runs: dict[str, RunState] = defaultdict(RunState)
        self.run_source: dict[str, S] = {}  # run -> the endpoint it was last heard from
        self._incomplete: dict[int, int] = {}  # id(source) -> answers in a row with missing
        self.warn: Callable[[str], None] = self._note

    def syncing(self) -> bool:
        """Whether any run waits for a snapshot."""
        return any(rs.syncing for rs in self.runs.values())

    def _want_all(self) -> None:
        for st in self._sources():
            st.wanted = True

    # ------------------------------------------------------------------ snapshots

    def on_snapshot(self, st: S, frames: list[bytes], out: list[Received]) -> None:
        """Take one frame set from ``st``'s snapshot service; append what it delivers to ``out``."""
        tag = frames[0] if frames else b""
        if tag == SNAPSHOT_MESSAGE:
            msg = self._decode(frames[1:])
            if msg is None or self._foreign(msg.run):
                return
            self.run_source[msg.run] = st
            rs = self.runs[msg.run]
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
                if self._foreign(run):
                    return
                self.run_source[run] = st
                rs = self.runs[run]
                if rs.syncing and not rs.was_live:  # the snapshot is the authority on where
                    rs.last_seq = max(seq, rs.delivered)  # the run is (a late one: not behind)
                else:  # a run that was live only moves forward
                    rs.last_seq = max(rs.last_seq, seq, rs.snapshot_top)
                self._end_snapshot(rs)
                self._flush(run, out)
        elif tag == SNAPSHOT_DONE:
            st.pending_since = None
            self.stats.snapshots += 1
            for run, rs in self.runs.items():  # an answer without a run's end marker
                if rs.in_snapshot and self.run_source.get(run) is st:
                    rs.last_seq = max(rs.last_seq, rs.snapshot_top)
                    live = rs.was_live
                    self._end_snapshot(rs)
                    if live:
                        self._flush(run, out)
                    else:
                        rs.syncing = True
            if self._ask_again(st, frames):
                return
            self.release_stuck(out)
        else:
            self.stats.malformed += 1

    def _note(self, text: str) -> None:
        self.stats.last_error = text
        self.stats.warnings.append(text)

    def _ask_again(self, st: S, done: list[bytes]) -> bool:
        """Whether ``st``'s answer left upstreams out (a relay's ``missing``) while runs wait
        for their history: then it is asked again (True), up to :data:`INCOMPLETE_RETRIES`
        answers in a row; after that the waiting runs are named in a warning (False)."""
        missing = decode_control(done[1]).get("missing", 0) if len(done) >= 2 else 0
        waiting = sorted(r for r, rs in self.runs.items() if rs.syncing and rs.buffer)
        if not isinstance(missing, int) or missing <= 0 or not waiting:
            self._incomplete.pop(id(st), None)
            return False
        tries = self._incomplete.get(id(st), 0) + 1
        if tries <= INCOMPLETE_RETRIES:
            self._incomplete[id(st)] = tries
            st.wanted = True
            return True
        self._incomplete.pop(id(st), None)
        names = ", ".join(waiting[:5]) + (
            f" and {len(waiting) - 5} more" if len(waiting) > 5 else ""
        )
        self.warn(
            f"{missing} upstream(s) did not answer {tries} snapshots in a row: run(s) {names} "
            "shown from their latest messages, their history before is missing"
        )
        return False

    @staticmethod
    def _end_snapshot(rs: RunState) -> None:
        rs.in_snapshot = rs.was_live = rs.syncing = False
        rs.snapshot_top = -1

    def release_stuck(self, out: list[Received]) -> None:
        """Once no snapshot is pending, runs no snapshot covered go live from what arrived."""
        if any(st.pending_since is not None or st.wanted for st in self._sources()):
            return
        for run, rs in self.runs.items():
            if rs.syncing and rs.buffer:
                self._go_live(run, out)

    def _go_live(self, run: str, out: list[Received]) -> None:
        """Stop waiting for a snapshot of ``run``: deliver its buffer from the oldest message."""
        rs = self.runs[run]
        top = rs.snapshot_top
        self._end_snapshot(rs)
        rs.last_seq = max(rs.last_seq, top, min(m.seq for m, _ in rs.buffer) - 1)
        self._flush(run, out)

    def _flush(self, run: str, out: list[Received]) -> None:
        rs = self.runs[run]
        buffered, rs.buffer = sorted(rs.buffer, key=lambda r: r[0].seq), []
        for msg, frames in buffered:
            self._apply_live(msg, frames, out)

    def flush_pending(self) -> list[Received]:
        """Give up waiting for snapshots: return every buffered message, per run in seq order."""
        out: list[Received] = []
        for run, rs in self.runs.items():
            if rs.buffer:
                self._go_live(run, out)
        return out

    # ------------------------------------------------------------------ live updates

    def _foreign(self, run: str) -> bool:
        """Whether ``run`` is not taken (counted)."""
        if self.accept is None or self.accept(run):
            return False
        self.stats.foreign += 1
        return True

    def _decode(self, frames: list[bytes]) -> p.AnyMessage | None:
        try:
            return p.decode(frames)
        except p.ProtocolError as exc:
            self.stats.malformed += 1
            self.stats.last_error = str(exc)
            return None

    def _apply_live(self, msg: p.AnyMessage, frames: list[bytes], out: list[Received]) -> None:
        rs = self.runs[msg.run]
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
            st = self.run_source.get(msg.run)
            if st is not None:
                st.wanted = True
            else:
                self._want_all()
            return
        rs.last_seq = msg.seq
        rs.delivered = max(rs.delivered, msg.seq)
        out.append((msg, frames))

    def on_live(self, frames: list[bytes], out: list[Received]) -> None:
        """Take one frame set from the subscription; append what it delivers to ``out``."""
        msg = self._decode(frames)
        if msg is None or self._foreign(msg.run):
            return
        self.stats.received += 1
        if msg.run not in self.runs:
            self.runs[msg.run]  # a run never seen: fetch its history first
            self._want_all()
        self._apply_live(msg, frames, out)
