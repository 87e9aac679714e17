"""``.stiff`` session files (DESIGN §4): an append-only log of wire messages.

Layout, all integers little-endian::

    magic (8 bytes, b"\\x89STIFF\\r\\n") | u32 format version
    record*  where record = u32 length | u32 crc32(payload) | payload
                   payload = (u32 frame length | frame bytes)*   -- the message's ZeroMQ frames

A record is written with one ``write`` call and flushed, so a writer that dies leaves at worst one
torn record at the end. Readers stop cleanly at the first short, oversized or bad-CRC record and
report how many bytes they ignored; :meth:`SessionReader.follow` tails a file that is still
growing. Opening an existing file for writing cuts such a torn tail off before appending.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Literal

import numpy as np
import numpy.typing as npt

from stiffmon.protocol import AnyMessage, Message, ProtocolError, decode, encode

MAGIC = b"\x89STIFF\r\n"
FORMAT_VERSION = 1
FILE_HEADER = MAGIC + struct.pack("<I", FORMAT_VERSION)
HEADER_SIZE = len(FILE_HEADER)
MAX_RECORD_BYTES = 512 << 20
"""A length field above this is treated as corruption, not as a record to wait for."""

_REC = struct.Struct("<II")
_U32 = struct.Struct("<I")
_READ_BUFFER = 1 << 20
_STEP_RE = re.compile(rb'"step":\s*(\d+)')
_FIRST_STEP_RE = re.compile(rb'"first_step":\s*(\d+)')
_COLUMNS_TOPIC_END = b"/columns"
_MAX_STEP = (1 << 63) - 1

TailState = Literal["clean", "truncated", "bad-crc", "oversized", "bad-frames"]
FsyncPolicy = Literal["never", "always"] | float


class SessionError(ValueError):
    """Raised for files that are not readable stiffmon sessions."""


class SessionVersionError(SessionError):
    """Raised for a session file written in a format version this stiffmon does not know."""


def pack_frames(frames: Sequence[bytes | bytearray | memoryview]) -> bytes:
    """Serialise multipart frames as ``(u32 length | bytes)*``."""
    parts: list[bytes | bytearray | memoryview] = []
    for fr in frames:
        parts.append(_U32.pack(len(fr)))
        parts.append(fr)
    return b"".join(parts)


def unpack_frames(payload: bytes | memoryview) -> list[bytes]:
    """Split a record payload back into frames.

    Raises:
        SessionError: If the lengths do not tile the payload exactly.
    """
    view = memoryview(payload)
    frames: list[bytes] = []
    pos, end = 0, len(view)
    while pos < end:
        if end - pos < 4:
            raise SessionError("record payload ends inside a frame length")
        (n,) = _U32.unpack_from(view, pos)
        pos += 4
        if n > end - pos:
            raise SessionError(f"frame of {n} bytes overruns the record payload")
        frames.append(bytes(view[pos : pos + n]))
        pos += n
    return frames


def pack_record(frames: Sequence[bytes | bytearray | memoryview]) -> bytes:
    """Return the complete on-disk record for one message's frames."""
    payload = pack_frames(frames)
    return _REC.pack(len(payload), zlib.crc32(payload)) + payload


def check_file_header(head: bytes, path: str | os.PathLike[str] = "<file>") -> None:
    """Validate the first :data:`HEADER_SIZE` bytes of a session file.

    Raises:
        SessionError: Wrong magic or a file too short to hold the header.
        SessionVersionError: A format version other than :data:`FORMAT_VERSION`.
    """
    if len(head) < HEADER_SIZE and head != FILE_HEADER[: len(head)]:
        raise SessionError(f"{path}: not a stiffmon session file (starts with {head[:8]!r})")
    if len(head) < HEADER_SIZE:
        raise SessionError(
            f"{path}: {len(head)} bytes is too short for a stiffmon session header "
            f"({HEADER_SIZE} bytes)"
        )
    if head[: len(MAGIC)] != MAGIC:
        raise SessionError(f"{path}: not a stiffmon session file (magic {head[:8]!r})")
    (version,) = _U32.unpack_from(head, len(MAGIC))
    if version != FORMAT_VERSION:
        newer = " (newer: upgrade stiffmon)" if version > FORMAT_VERSION else ""
        raise SessionVersionError(
            f"{path}: session format version {version}{newer}; this stiffmon reads version "
            f"{FORMAT_VERSION}"
        )


@dataclass(frozen=True)
class RecordScan:
    """Where a scan of the records stopped.

    Attributes:
        end: Offset just past the last intact record.
        size: File size seen by the scan.
        state: Why the scan stopped (``"clean"`` at an exact end of file).
    """

    end: int
    size: int
    state: TailState

    @property
    def ignored_bytes(self) -> int:
        """Bytes after the last intact record."""
        return self.size - self.end


def _header_step(
    mm: mmap.mmap,
    start: int,
    stop: int,
    u32: Callable[..., tuple[int, ...]],
    search: Callable[..., re.Match[bytes] | None],
) -> int | None:
    """The top-level ``"step"`` of the JSON header frame of the record payload at [start, stop).

    The frame lengths are followed to the header frame, which is searched whole (JSON escapes
    every quote inside strings, and ``encode`` writes ``step`` before any nested object, so the
    first match is the header's own key). None for a record whose frames do not lead to a
    header or whose step is not a valid int64.
    """
    if stop - start < 4:
        return None
    (topic_len,) = u32(mm, start)
    header_len_at = start + 4 + topic_len
    if header_len_at + 4 > stop:
        return None
    (header_len,) = u32(mm, header_len_at)
    header_at = header_len_at + 4
    header_end = header_at + header_len
    if header_end > stop:
        return None
    m = search(mm, header_at, header_end)
    if m is None or len(m.group(1)) > 19:
        return None
    step = int(m.group(1))
    return step if step <= _MAX_STEP else None


def _columns_first_step(mm: mmap.mmap, start: int, stop: int) -> int | None:
    """``first_step`` of a ``columns`` record's header (None for other kinds or no match)."""
    (topic_len,) = _U32.unpack_from(mm, start)
    topic_end = start + 4 + topic_len
    if topic_end + 4 > stop or mm[topic_end - len(_COLUMNS_TOPIC_END) : topic_end] != (
        _COLUMNS_TOPIC_END
    ):
        return None
    (header_len,) = _U32.unpack_from(mm, topic_end)
    m = _FIRST_STEP_RE.search(mm, topic_end + 4, min(stop, topic_end + 4 + header_len))
    if m is None or len(m.group(1)) > 19:
        return None
    return int(m.group(1))


def _scan_index(
    mm: mmap.mmap, size: int, offsets: list[int], steps: list[int], firsts: list[int]
) -> tuple[int, TailState]:
    """Fill ``offsets``, ``steps`` and ``firsts`` (a record's first step: ``first_step`` of a
    ``columns`` batch, else its step) from a mapped session; return (end, tail state)."""
    view = memoryview(mm)
    unpack = _REC.unpack_from
    u32 = _U32.unpack_from
    crc32 = zlib.crc32
    search = _STEP_RE.search
    add_offset, add_step, add_first = offsets.append, steps.append, firsts.append
    pos, last_step = HEADER_SIZE, 0
    state: TailState = "clean"
    try:
        while pos < size:
            if size - pos < 8:
                state = "truncated"
                break
            length, crc = unpack(mm, pos)
            start, stop = pos + 8, pos + 8 + length
            if length > MAX_RECORD_BYTES:
                state = "oversized"
                break
            if stop > size:
                state = "truncated"
                break
            if crc32(view[start:stop]) != crc:
                state = "bad-crc"
                break
            step = _header_step(mm, start, stop, u32, search)
            first = None
            if step is not None:
                last_step = step
                first = _columns_first_step(mm, start, stop)
            add_offset(pos)
            add_step(last_step)
            add_first(last_step if first is None or first > last_step else first)
            pos = stop
    finally:
        view.release()
    return pos, state


def _iter_records(
    f: BinaryIO, start: int, size: int, scan: list[RecordScan]
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, payload)`` of intact records from ``start``; append the stop to ``scan``."""
    f.seek(start)
    pos = start
    state: TailState = "clean"
    while True:
        if pos == size:
            break
        head = f.read(8)
        if len(head) < 8:
            state = "truncated"
            break
        length, crc = _REC.unpack(head)
        if length > MAX_RECORD_BYTES:
            state = "oversized"
            break
        if length > size - pos - 8:
            state = "truncated"
            break
        payload = f.read(length)
        if len(payload) < length:
            state = "truncated"
            break
        if zlib.crc32(payload) != crc:
            state = "bad-crc"
            break
        yield pos, payload
        pos += 8 + length
    scan.append(RecordScan(end=pos, size=max(size, pos), state=state))


class SessionWriter:
    """Append messages to a ``.stiff`` file, one flushed record per message.

    Args:
        path: File to write. A new or empty file gets the header; an existing session file is
            appended to after cutting off a torn tail (see :attr:`recovered_bytes`).
        fsync: ``"never"`` (flush only), ``"always"`` (fsync every record) or a number of
            seconds: fsync at most that often.

    Raises:
        SessionError: If ``path`` exists and is not a stiffmon session file.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: FsyncPolicy = "never") -> None:
        if not (fsync in ("never", "always") or (isinstance(fsync, float | int) and fsync >= 0)):
            raise ValueError(f"fsync must be 'never', 'always' or seconds >= 0, got {fsync!r}")
        self.path = Path(path)
        self._fsync = fsync
        self._last_sync = time.monotonic()
        self.recovered_bytes = 0
        self.records_written = 0
        self._f: BinaryIO = open(self.path, "a+b")  # noqa: SIM115 - owned until close()
        try:
            self._prepare()
        except BaseException:
            self._f.close()
            raise

    def _prepare(self) -> None:
        f = self._f
        size = f.seek(0, os.SEEK_END)
        if size < HEADER_SIZE:
            f.seek(0)
            head = f.read(size)
            if head != FILE_HEADER[:size]:
                raise SessionError(f"{self.path}: exists and is not a stiffmon session file")
            f.truncate(0)
            f.write(FILE_HEADER)
            f.flush()
            return
        f.seek(0)
        check_file_header(f.read(HEADER_SIZE), self.path)
        scan: list[RecordScan] = []
        for _ in _iter_records(f, HEADER_SIZE, size, scan):
            pass
        if scan[0].end < size:
            self.recovered_bytes = size - scan[0].end
            f.truncate(scan[0].end)
        f.seek(0, os.SEEK_END)

    def write_frames(self, frames: Sequence[bytes | bytearray | memoryview]) -> int:
        """Append one message given as its wire frames; return the record's offset."""
        record = pack_record(frames)
        offset = self._f.tell()
        self._f.write(record)
        self._f.flush()
        self.records_written += 1
        if self._fsync == "always":
            os.fsync(self._f.fileno())
        elif self._fsync != "never":
            now = time.monotonic()
            if now - self._last_sync >= float(self._fsync):
                os.fsync(self._f.fileno())
                self._last_sync = now
        return offset

    def write(self, msg: Message) -> int:
        """Append one message; return the record's offset."""
        return self.write_frames(encode(msg))

    def close(self) -> None:
        """Flush, fsync unless the policy is ``"never"``, and close."""
        if self._f.closed:
            return
        self._f.flush()
        if self._fsync != "never":
            os.fsync(self._f.fileno())
        self._f.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._f.closed

    def __enter__(self) -> SessionWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True)
class SessionIndex:
    """Step → offset index of a session file.

    Attributes:
        offsets: Offset of every intact record, in file order.
        steps: The ``step`` of every record (the last step of a ``columns`` batch).
        first_steps: The first step of every record (of a ``columns`` batch: its
            ``first_step``; of other records: ``steps``), so a batch spans
            ``first_steps[i]..steps[i]``.
        reach: Running maximum of ``steps``; non-decreasing, so it can be bisected even when
            several runs interleave or a run restarts.
        end: Offset just past the last intact record.
    """

    offsets: npt.NDArray[np.int64]
    steps: npt.NDArray[np.int64]
    reach: npt.NDArray[np.int64]
    end: int
    first_steps: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def offset_for_step(self, step: int) -> int:
        """Offset of the first record by which the session has reached ``step`` (O(log n)).

        For a session of ``columns`` batches that is the batch holding ``step``. Returns
        :attr:`end` if no record reaches ``step``.
        """
        i = int(np.searchsorted(self.reach, step, side="left"))
        return int(self.offsets[i]) if i < len(self) else self.end


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
        self.restarts = 0  # times follow() started over on a replaced or rewritten file

    @property
    def ignored_bytes(self) -> int:
        """Bytes the last complete pass ignored after the last intact record (0 before one)."""
        return self.last_scan.ignored_bytes if self.last_scan else 0

    def records(
        self, start: int = HEADER_SIZE, *, on_error: Literal["raise", "skip"] = "raise"
    ) -> Iterator[tuple[int, list[bytes]]]:
        """Yield ``(offset, frames)`` for each intact record from offset ``start``.

        Stops at the end of the file or at the first torn/corrupt record; afterwards
        :attr:`last_scan` says where and why.

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
            for offset, payload in _iter_records(f, start, size, scan):
                try:
                    frames = unpack_frames(payload)
                except SessionError as exc:
                    if on_error == "skip":
                        self.skipped_records += 1
                        continue
                    self.last_scan = RecordScan(offset, size, "bad-frames")
                    raise SessionError(f"{self.path}: record at offset {offset}: {exc}") from exc
                yield offset, frames
            self.last_scan = scan[0]

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
                self.skipped_records += 1

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
        end = HEADER_SIZE
        state: TailState = "clean"
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > HEADER_SIZE:
                with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mm:
                    end, state = _scan_index(mm, size, offsets, steps, firsts)
        self.last_scan = RecordScan(end=end, size=max(size, end), state=state)
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
        raises :class:`SessionError`.

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
            got = False
            last: tuple[int, list[bytes]] | None = None
            for offset, frames in self.records(pos, on_error=on_error):
                last = (offset, frames)
                try:
                    msg = decode(frames)
                except ProtocolError as exc:
                    if on_error == "raise":
                        raise SessionError(
                            f"{self.path}: record at offset {offset}: {exc}"
                        ) from exc
                    self.skipped_records += 1
                    continue
                got = True
                yield msg
            assert self.last_scan is not None
            if last is not None:  # the head it was read with: length and CRC of its payload
                payload = pack_frames(last[1])
                mark = (last[0], _REC.pack(len(payload), zlib.crc32(payload)))
            pos = self.last_scan.end
            now = time.monotonic()
            if got:
                last_data = now
                continue
            if self._rewritten(identity, pos, mark):
                identity = _identity(self.path)
                if identity is None:  # gone for now (rotation in progress): wait for it
                    time.sleep(poll_interval)
                    continue
                with open(self.path, "rb") as f:
                    head = f.read(HEADER_SIZE)
                if len(head) < HEADER_SIZE and head == FILE_HEADER[: len(head)]:
                    time.sleep(poll_interval)  # the new writer has not written its header yet
                    identity = None
                    continue
                check_file_header(head, self.path)
                self.restarts += 1
                pos, mark = HEADER_SIZE, None
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
