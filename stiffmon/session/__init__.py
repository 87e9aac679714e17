"""``.stiff`` session files (DESIGN §4): an append-only log of wire messages.

Layout, all integers little-endian::

    magic (8 bytes, b"\\x89STIFF\\r\\n") | u32 format version
    record*  where record = u32 length | u32 crc32(payload) | payload
                   payload = (u32 frame length | frame bytes)*   -- the message's ZeroMQ frames

A record is written with one ``write`` call and flushed, so a writer that dies leaves at worst one
torn record at the end. A damaged record (bad CRC, impossible length) followed by intact ones is
skipped: readers resynchronise on the next intact record and report its offset and the bytes
skipped. One with no intact record after it is the torn tail: readers stop there and report how
many bytes they ignored; :meth:`SessionReader.follow` tails a file that is still
growing. Opening an existing file for writing cuts such a torn tail off before appending.

The package is split by concern; every name used elsewhere is re-exported here:

* ``records``: the file header, record framing and the constants and errors of the format;
* ``index``: :class:`SessionIndex` and the scan that builds it;
* ``writer``: :class:`SessionWriter`;
* ``reader``: :class:`SessionReader` (with :meth:`~SessionReader.follow`) and :func:`read_session`;
* ``merge``: :func:`read_sessions` / :class:`SessionMerge`: several files as one, each message of
  a run once (by ``seq``), with a :class:`FileReport` of what was skipped per file.
"""

from __future__ import annotations

from stiffmon.session.index import SessionIndex
from stiffmon.session.merge import FileReport, SessionMerge, read_sessions
from stiffmon.session.reader import SessionReader, read_session
from stiffmon.session.records import _REC as _REC  # used by tests that forge records
from stiffmon.session.records import (
    FILE_HEADER,
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    MAX_RECORD_BYTES,
    FsyncPolicy,
    RecordScan,
    SessionError,
    SessionVersionError,
    TailState,
    check_file_header,
    pack_frames,
    pack_record,
    unpack_frames,
)
from stiffmon.session.writer import SessionWriter

__all__ = [
    "FILE_HEADER",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_RECORD_BYTES",
    "FileReport",
    "FsyncPolicy",
    "RecordScan",
    "SessionError",
    "SessionIndex",
    "SessionMerge",
    "SessionReader",
    "SessionVersionError",
    "SessionWriter",
    "TailState",
    "check_file_header",
    "pack_frames",
    "pack_record",
    "read_session",
    "read_sessions",
    "unpack_frames",
]
