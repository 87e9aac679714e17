"""The ``.stiff`` file header and record framing: constants, errors, packing, record scans."""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Literal

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
