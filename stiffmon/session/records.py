"""The ``.stiff`` file header and record framing: constants, errors, packing, record scans."""

from __future__ import annotations

import mmap
import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Literal

import numpy as np
import numpy.typing as npt

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
_RESYNC_WINDOW = 1 << 20
_RESYNC_MAX_TOPIC = 4096
_MIN_RECORD = 17  # head, topic and header lengths, and the header's "{"

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
    damaged: tuple[tuple[int, int], ...] = ()

    @property
    def ignored_bytes(self) -> int:
        """Bytes after the last intact record (the torn tail)."""
        return self.size - self.end

    @property
    def damaged_bytes(self) -> int:
        """Bytes of damaged records skipped before the last intact record."""
        return sum(n for _, n in self.damaged)


def _u32_at(b: npt.NDArray[np.uint8], idx: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Little-endian u32 at every index of ``idx`` in the byte array ``b`` (as int64)."""
    out: npt.NDArray[np.int64] = b[idx].astype(np.int64)
    for k in (1, 2, 3):
        out |= b[idx + k].astype(np.int64) << (8 * k)
    return out


def _is_record(buf: bytes | mmap.mmap, pos: int, length: int, crc: int) -> bool:
    """Whether the ``length``-byte payload at ``pos + 8`` has CRC ``crc`` and tiles >= 2 frames."""
    payload = buf[pos + 8 : pos + 8 + length]
    if zlib.crc32(payload) != crc:
        return False
    try:
        return len(unpack_frames(payload)) >= 2
    except SessionError:
        return False


def find_record(buf: bytes | mmap.mmap, start: int, size: int) -> int | None:
    """Offset of the first intact record at or after ``start`` (None if there is none).

    Used to resynchronise after a damaged record: a candidate needs a plausible length, a topic
    frame followed by a JSON header frame (starting with ``{``) inside the payload, a matching
    CRC-32 and frames that tile the payload. Candidates are filtered a window at a time with
    numpy, so skipping a damaged region costs little more than reading it.

    Args:
        buf: The file's bytes (an ``mmap`` or ``bytes``) up to at least ``size``.
        start: First offset to try.
        size: Size of the data in ``buf``.
    """
    pos = start
    last = size - _MIN_RECORD  # the last offset a record can start at
    while pos <= last:
        wend = min(last + 1, pos + _RESYNC_WINDOW)
        hi = min(size, wend + 16 + _RESYNC_MAX_TOPIC + 1)
        b = np.frombuffer(buf[pos:hi], dtype=np.uint8)
        rel = np.arange(wend - pos, dtype=np.int64)
        length = _u32_at(b, rel)
        ok = (length >= _MIN_RECORD - 8) & (length <= MAX_RECORD_BYTES)
        ok &= pos + rel + 8 + length <= size
        cand, length = rel[ok], length[ok]
        topic = _u32_at(b, cand + 8)
        ok = (topic <= _RESYNC_MAX_TOPIC) & (cand + 16 + topic < len(b))
        cand, length, topic = cand[ok], length[ok], topic[ok]
        header = _u32_at(b, cand + 12 + topic)
        ok = (b[cand + 16 + topic] == ord("{")) & (16 + topic + header <= 8 + length)
        for c, n in zip(cand[ok].tolist(), length[ok].tolist(), strict=True):
            at = int(pos + c)
            crc = int(_U32.unpack_from(buf, at + 4)[0])
            if _is_record(buf, at, n, crc):
                return at
        pos = wend
    return None


def _resync(f: BinaryIO, pos: int, size: int) -> int | None:
    """:func:`find_record` after the damaged record at ``pos`` of the open file ``f``."""
    if size - pos - 1 < _MIN_RECORD:
        return None
    with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mm:
        return find_record(mm, pos + 1, size)


def _iter_records(
    f: BinaryIO, start: int, size: int, scan: list[RecordScan], *, resync: bool = True
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, payload)`` of intact records from ``start``; append the stop to ``scan``.

    A damaged record followed by an intact one is skipped (resynchronising on the next intact
    record, see :func:`find_record`) and noted in the scan's ``damaged``; one with no intact
    record after it is the torn tail, where the scan stops. Without ``resync`` the scan stops
    at the first damaged record.
    """
    f.seek(start)
    pos = start
    state: TailState = "clean"
    damaged: list[tuple[int, int]] = []
    while pos != size:
        head = f.read(8)
        payload = b""
        if len(head) < 8:
            state = "truncated"
        else:
            length, crc = _REC.unpack(head)
            if length > MAX_RECORD_BYTES:
                state = "oversized"
            elif length > size - pos - 8:
                state = "truncated"
            else:
                payload = f.read(length)
                if len(payload) < length:
                    state = "truncated"
                elif zlib.crc32(payload) != crc:
                    state = "bad-crc"
        if state != "clean":
            nxt = _resync(f, pos, size) if resync else None
            if nxt is None:
                break
            damaged.append((pos, nxt - pos))
            state = "clean"
            pos = nxt
            f.seek(pos)
            continue
        yield pos, payload
        pos += 8 + len(payload)
    scan.append(RecordScan(end=pos, size=max(size, pos), state=state, damaged=tuple(damaged)))
