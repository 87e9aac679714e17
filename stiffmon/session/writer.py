""":class:`SessionWriter`: append messages to a ``.stiff`` file, one flushed record each.

A write that fails (disk full, a file system gone read-only) leaves no part of its record in the
file: the file is cut back to the end of the last whole record, so it stays readable to there, and
the writer can be given the next record (or the same one again) once space returns. A file that
was deleted while open (``st_nlink == 0``) is refused at the next write, checked at most once a
second: what would be written to it could never be read.
"""

from __future__ import annotations

import errno
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
        self.failed_writes = 0  # records refused by the OS (nothing of them left in the file)
        self._checked_link = time.monotonic()
        # unbuffered: every record goes to the OS whole or (cut back) not at all
        self._f: BinaryIO = open(self.path, "a+b", buffering=0)  # noqa: SIM115 - owned until close()
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
            self._end = 0
            self._append(FILE_HEADER)
            return
        f.seek(0)
        check_file_header(f.read(HEADER_SIZE), self.path)
        scan: list[RecordScan] = []
        for _ in _iter_records(f, HEADER_SIZE, size, scan):
            pass
        if scan[0].end < size:
            self.recovered_bytes = size - scan[0].end
            f.truncate(scan[0].end)
        self._end = f.seek(0, os.SEEK_END)

    def _append(self, data: bytes) -> int:
        """Append ``data`` (the file is opened ``O_APPEND``); return where it starts. On an
        error the file is cut back to the end of the last whole record (only where nothing but
        this write's own bytes lie beyond it), and the error is raised."""
        fd = self._f.fileno()
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):
                n = os.write(fd, view[done:])
                if n <= 0:  # pragma: no cover - a regular file never takes 0 of > 0 bytes
                    raise OSError(errno.EIO, "the file took no bytes")
                done += n
        except BaseException:
            self.failed_writes += 1
            try:
                size = os.fstat(fd).st_size
                if self._end < size <= self._end + done:  # our torn bytes, no one else's
                    os.ftruncate(fd, self._end)
            except OSError:  # pragma: no cover - a reader cuts a torn tail anyway
                pass
            raise
        self._end = os.lseek(fd, 0, os.SEEK_CUR)
        return self._end - len(view)

    def _check_link(self) -> None:
        now = time.monotonic()
        if now - self._checked_link < 1.0:
            return
        self._checked_link = now
        if os.fstat(self._f.fileno()).st_nlink == 0:
            raise SessionError(
                f"{self.path} was deleted while being written: what follows could never be read"
            )

    def write_frames(self, frames: Sequence[bytes | bytearray | memoryview]) -> int:
        """Append one message given as its wire frames; return the record's offset.

        Raises:
            OSError: The OS refused the record (e.g. ``ENOSPC``): nothing of it is in the file,
                which still ends with the last whole record; a later call may succeed.
            SessionError: The file was deleted while open.
        """
        self._check_link()
        record = pack_record(frames)
        offset = self._append(record)
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
        try:
            if self._fsync != "never":
                os.fsync(self._f.fileno())
        finally:
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
