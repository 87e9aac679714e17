""":class:`SessionWriter`: append messages to a ``.stiff`` file, one flushed record each."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from stiffmon.protocol import Message, encode
from stiffmon.session.records import (
    FILE_HEADER,
    HEADER_SIZE,
    FsyncPolicy,
    RecordScan,
    SessionError,
    _iter_records,
    check_file_header,
    pack_record,
)


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
