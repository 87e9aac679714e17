""":class:`SessionReader` (messages, index, tail-following) and :func:`read_session`."""

from __future__ import annotations

import json
import mmap
import os
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from stiffmon.protocol import AnyMessage, ProtocolError, ProtocolVersionError, decode
from stiffmon.protocol.limits import PROTOCOL_VERSION
from stiffmon.session.index import SessionIndex, _scan_index
from stiffmon.session.records import (
    _READ_BUFFER,
    _REC,
    FILE_HEADER,
    HEADER_SIZE,
    RecordScan,
    SessionError,
    TailState,
    _iter_records,
    _resync,
    check_file_header,
    pack_frames,
    unpack_frames,
)

MAX_SKIP_REASONS = 5


class SessionReader:
    """Read a ``.stiff`` file: messages in order, an index for seeking, and tail-following.

    Args:
        path: The session file.

    Raises:
        SessionError: Wrong magic, or a file too short for the header.
        SessionVersionError: Unknown format version.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            check_file_header(f.read(HEADER_SIZE), self.path)
        self.last_scan: RecordScan | None = None
        self.skipped_records = 0
        self.skip_reasons: list[str] = []  # the first few, "offset N: why"
        self.newer_version: int | None = None  # the newest too-new protocol version skipped
        self.damaged: dict[int, int] = {}  # offset of a damaged record -> bytes skipped there
        self.restarts = 0  # times follow() started over on a replaced or rewritten file

    def _note_damage(self, scan: RecordScan) -> None:
        self.damaged.update(scan.damaged)

    def _skip(self, offset: int, exc: Exception, frames: list[bytes] | None = None) -> None:
        """Count a skipped record and remember why (the first few reasons)."""
        self.skipped_records += 1
        if len(self.skip_reasons) < MAX_SKIP_REASONS:
            self.skip_reasons.append(f"offset {offset}: {exc}")
        if isinstance(exc, ProtocolVersionError) and frames is not None and len(frames) > 1:
            try:
                v = json.loads(frames[1]).get("v")
            except (ValueError, AttributeError):
                return
            if isinstance(v, int) and v > PROTOCOL_VERSION:
                self.newer_version = max(v, self.newer_version or v)

    @property
    def ignored_bytes(self) -> int:
        """Bytes the last complete pass ignored after the last intact record (0 before one)."""
        return self.last_scan.ignored_bytes if self.last_scan else 0

    def records(
        self,
        start: int = HEADER_SIZE,
        *,
        on_error: Literal["raise", "skip"] = "raise",
        resync: bool = True,
    ) -> Iterator[tuple[int, list[bytes]]]:
        """Yield ``(offset, frames)`` for each intact record from offset ``start``.

        A damaged record followed by intact ones is skipped (its offset and size are noted in
        :attr:`damaged` and in :attr:`last_scan`); reading stops at the end of the file or at a
        torn tail. Afterwards :attr:`last_scan` says where and why.

        Args:
            start: Offset of a record.
            on_error: What to do with an intact record (valid CRC) whose frames do not tile its
                payload: raise, or skip it, count it in :attr:`skipped_records` and go on.

        Raises:
            SessionError: Such a record, with ``on_error="raise"``.
        """
        start = max(start, HEADER_SIZE)
        with open(self.path, "rb", buffering=_READ_BUFFER) as f:
            size = os.fstat(f.fileno()).st_size
            scan: list[RecordScan] = []
            for offset, payload in _iter_records(f, start, size, scan, resync=resync):
                try:
                    frames = unpack_frames(payload)
                except SessionError as exc:
                    if on_error == "skip":
                        self._skip(offset, exc)
                        continue
                    self.last_scan = RecordScan(offset, size, "bad-frames")
                    raise SessionError(f"{self.path}: record at offset {offset}: {exc}") from exc
                yield offset, frames
            self.last_scan = scan[0]
            self._note_damage(scan[0])

    def messages(
        self, start: int = HEADER_SIZE, *, on_error: Literal["raise", "skip"] = "raise"
    ) -> Iterator[AnyMessage]:
        """Yield the decoded messages from offset ``start`` in file order.

        Args:
            start: Offset of a record (e.g. from :meth:`SessionIndex.offset_for_step`).
            on_error: What to do with an intact record that is not a valid message (its frames
                do not tile, or do not decode): raise :class:`SessionError`, or skip it, count
                it in :attr:`skipped_records` and go on with the next record.
        """
        for offset, frames in self.records(start, on_error=on_error):
            try:
                yield decode(frames)
            except ProtocolError as exc:
                if on_error == "raise":
                    raise SessionError(f"{self.path}: record at offset {offset}: {exc}") from exc
                self._skip(offset, exc, frames)

    def __iter__(self) -> Iterator[AnyMessage]:
        return self.messages()

    def index(self) -> SessionIndex:
        """Scan the file once and build the step → offset index.

        A tight loop over the memory-mapped file: record lengths and CRCs are checked (the scan
        stops at a torn or corrupt record, like :meth:`records`), and only the ``"step"`` of
        each JSON header is read, with a regular expression, not the whole message.
        """
        offsets: list[int] = []
        steps: list[int] = []
        firsts: list[int] = []
        damaged: list[tuple[int, int]] = []
        end = HEADER_SIZE
        state: TailState = "clean"
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > HEADER_SIZE:
                with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mm:
                    end, state = _scan_index(mm, size, offsets, steps, firsts, damaged)
        self.last_scan = RecordScan(
            end=end, size=max(size, end), state=state, damaged=tuple(damaged)
        )
        self._note_damage(self.last_scan)
        step_arr = np.asarray(steps, dtype=np.int64)
        return SessionIndex(
            offsets=np.asarray(offsets, dtype=np.int64),
            steps=step_arr,
            reach=np.maximum.accumulate(step_arr) if len(step_arr) else step_arr,
            end=end,
            first_steps=np.asarray(firsts, dtype=np.int64),
        )

    def follow(
        self,
        start: int = HEADER_SIZE,
        *,
        poll_interval: float = 0.1,
        stop: Callable[[], bool] | None = None,
        idle_timeout: float | None = None,
        on_error: Literal["raise", "skip"] = "raise",
    ) -> Iterator[AnyMessage]:
        """Yield messages as another process appends them (``tail -f``).

        At the end of the data, or at a torn record the writer may still be completing, it
        sleeps ``poll_interval`` and reads again from the same offset. If the file is replaced
        (another inode at the path: a rotation) or rewritten (it shrank below the offset, or the
        last record read is no longer where it was), following restarts from the first record
        of the new content and :attr:`restarts` counts it; content that is not a session
        raises :class:`SessionError`. A damaged record with intact ones after it, in a file that
        was not rewritten, is skipped and noted in :attr:`damaged`.

        Args:
            start: Offset to start from.
            poll_interval: Seconds between polls at the end of the file.
            stop: Called between polls; following ends when it returns True.
            idle_timeout: End after this many seconds without new records (None: never).
            on_error: As in :meth:`messages`.
        """
        pos = max(start, HEADER_SIZE)
        last_data = time.monotonic()
        identity = _identity(self.path)
        mark: tuple[int, bytes] | None = None  # (offset, 8-byte head) of the last record read
        while True:
            got = missing = False
            last: tuple[int, list[bytes]] | None = None
            try:
                for offset, frames in self.records(pos, on_error=on_error, resync=False):
                    last = (offset, frames)
                    try:
                        msg = decode(frames)
                    except ProtocolError as exc:
                        if on_error == "raise":
                            raise SessionError(
                                f"{self.path}: record at offset {offset}: {exc}"
                            ) from exc
                        self._skip(offset, exc, frames)
                        continue
                    got = True
                    yield msg
            except FileNotFoundError:  # rotated away, the new file not there yet
                missing = True
            if not missing:
                assert self.last_scan is not None
                if last is not None:  # the head it was read with: length and CRC of its payload
                    payload = pack_frames(last[1])
                    mark = (last[0], _REC.pack(len(payload), zlib.crc32(payload)))
                pos = self.last_scan.end
            now = time.monotonic()
            if got:
                last_data = now
                continue
            if missing or self._rewritten(identity, pos, mark):
                identity = _identity(self.path)
                head = b""
                if identity is not None:
                    try:
                        with open(self.path, "rb") as f:
                            head = f.read(HEADER_SIZE)
                    except FileNotFoundError:
                        identity = None
                if identity is None:  # gone for now (rotation in progress): wait for it
                    if stop is not None and stop():
                        return
                    time.sleep(poll_interval)
                    continue
                if len(head) < HEADER_SIZE and head == FILE_HEADER[: len(head)]:
                    time.sleep(poll_interval)  # the new writer has not written its header yet
                    identity = None
                    continue
                check_file_header(head, self.path)
                self.restarts += 1
                pos, mark = HEADER_SIZE, None
                continue
            if self.last_scan is not None and self.last_scan.state != "clean":
                nxt = _next_record(self.path, pos)  # damaged, not torn: intact records follow
                if nxt is not None:
                    self.damaged[pos] = nxt - pos
                    pos = nxt
                    continue
            if stop is not None and stop():
                return
            if idle_timeout is not None and now - last_data >= idle_timeout:
                return
            time.sleep(poll_interval)

    def _rewritten(
        self, identity: tuple[int, int] | None, pos: int, mark: tuple[int, bytes] | None
    ) -> bool:
        """Whether the followed file was replaced, truncated or rewritten under the reader."""
        now = _identity(self.path)
        if now is None or now != identity:
            return True
        try:
            size = self.path.stat().st_size
        except OSError:
            return True
        if size < pos:
            return True
        return mark is not None and _read_at(self.path, mark[0], 8) != mark[1]


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, None if it is not there."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _next_record(path: Path, pos: int) -> int | None:
    """Offset of the first intact record after the damaged one at ``pos`` (None: none yet)."""
    try:
        with open(path, "rb") as f:
            return _resync(f, pos, os.fstat(f.fileno()).st_size)
    except OSError:
        return None


def _read_at(path: Path, offset: int, n: int) -> bytes:
    """``n`` bytes of ``path`` at ``offset`` (fewer at the end; empty if unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(n)
    except OSError:
        return b""


def read_session(path: str | os.PathLike[str]) -> tuple[list[AnyMessage], RecordScan]:
    """Read every intact message of a session file.

    Returns:
        The messages and where/why reading stopped (``scan.ignored_bytes`` for a torn tail).
    """
    reader = SessionReader(path)
    msgs = list(reader.messages())
    assert reader.last_scan is not None
    return msgs, reader.last_scan
