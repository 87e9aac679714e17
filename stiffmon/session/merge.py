"""Read several session files as one: each message of a run once, and what was skipped, said.

The same run is often recorded twice (``stiffmon record`` next to the agent's own recording, a
copy of a file, a file given twice). A message is identified by its run and ``seq``: one seen
before is the same message and is kept once; a ``columns`` message that joins batches keeps only
the batches not seen yet, so overlapping or partial copies union cleanly. A run read from more
than one file is put back in ``seq`` order.

Every file gets a :class:`FileReport` (damaged records skipped, a torn tail, records that are
not valid messages, a protocol version newer than this stiffmon's), and
:meth:`FileReport.notes` says it in words, the same for every tool.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stiffmon.protocol import AnyMessage, Columns
from stiffmon.protocol.limits import PROTOCOL_VERSION
from stiffmon.session.reader import SessionReader
from stiffmon.session.records import HEADER_SIZE, SessionError

MAX_DAMAGE_NOTES = 5


@dataclass
class FileReport:
    """What reading one session file gave and skipped.

    Attributes:
        path: The file.
        messages: Messages decoded from it (duplicates included).
        duplicates: Of those, messages already read (same run and ``seq``) from it or another.
        runs: The runs it holds, in order of first appearance.
        skipped: Intact records that are not valid messages (skipped).
        skip_reasons: The first few reasons, ``offset N: why``.
        newer_version: The newest protocol version among them that this stiffmon is too old
            for (None: none).
        damaged: Offset of each damaged record → bytes skipped there (intact records follow).
        torn_tail: Bytes ignored after the last intact record.
    """

    path: Path
    messages: int = 0
    duplicates: int = 0
    runs: list[str] = field(default_factory=list)
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    newer_version: int | None = None
    damaged: dict[int, int] = field(default_factory=dict)
    torn_tail: int = 0

    def update(self, reader: SessionReader) -> None:
        """Take the reader's counts (they are cumulative over its passes)."""
        self.skipped = reader.skipped_records
        self.skip_reasons = list(reader.skip_reasons)
        self.newer_version = reader.newer_version
        self.damaged = dict(reader.damaged)
        self.torn_tail = reader.ignored_bytes

    def notes(self, name: str | None = None) -> list[str]:
        """Warnings in words, worst first (empty when the file was read whole)."""
        where = str(self.path) if name is None else name
        out = []
        if self.newer_version is not None:
            out.append(
                f"{where}: protocol version {self.newer_version} is newer than this stiffmon "
                f"understands ({PROTOCOL_VERSION}): upgrade stiffmon "
                f"({self.skipped} record{'s' if self.skipped != 1 else ''} skipped)"
            )
        for offset, n in sorted(self.damaged.items())[:MAX_DAMAGE_NOTES]:
            out.append(f"{where}: damaged record at offset {offset}: skipped {n} bytes")
        if len(self.damaged) > MAX_DAMAGE_NOTES:
            more = sorted(self.damaged.items())[MAX_DAMAGE_NOTES:]
            out.append(
                f"{where}: {len(more)} more damaged records: skipped {sum(n for _, n in more)} "
                "bytes"
            )
        if self.skipped and self.newer_version is None:
            first = f" (first: {self.skip_reasons[0]})" if self.skip_reasons else ""
            plural = "s" if self.skipped != 1 else ""
            out.append(f"{where}: skipped {self.skipped} malformed record{plural}{first}")
        if self.torn_tail:
            out.append(f"{where}: ignored a torn tail of {self.torn_tail} bytes")
        return out


class SessionMerge:
    """Messages of session files, each (run, ``seq``) once; a report per file.

    Use :meth:`read` per file (or :meth:`read_more` to follow a growing one), then
    :meth:`messages` for all of them.
    """

    def __init__(self) -> None:
        self.reports: dict[Path, FileReport] = {}
        self.readers: dict[Path, SessionReader] = {}
        self.offsets: dict[Path, int] = {}
        self._seen: dict[str, set[int]] = {}
        self._by_run: dict[str, list[AnyMessage]] = {}
        self._files_of: dict[str, set[Path]] = {}
        self.unopened: dict[Path, str] = {}  # file -> why it could not be opened as a session

    def unique(self, msg: AnyMessage) -> AnyMessage | None:
        """``msg`` if it is new, the part of it that is (a ``columns`` batch), or None."""
        seen = self._seen.setdefault(msg.run, set())
        if not isinstance(msg, Columns):
            if msg.seq in seen:
                return None
            seen.add(msg.seq)
            return msg
        seqs, ends = msg.batches()
        new = np.array([s not in seen for s in seqs.tolist()], dtype=bool)
        seen.update(seqs.tolist())
        if new.all():
            return msg
        if not new.any():
            return None
        starts = np.concatenate(([0], ends[:-1]))
        rows = np.concatenate(
            [np.arange(a, b) for a, b, k in zip(starts, ends, new, strict=True) if k]
        )
        lens = (ends - starts)[new]
        return Columns.from_columns(
            {n: v[rows] for n, v in zip(msg.names, msg.values, strict=True)},
            msg.steps[rows],
            msg.times[rows],
            run=msg.run,
            seq=int(seqs[new][-1]),
            batch_seqs=seqs[new],
            batch_ends=np.cumsum(lens),
            sparse=msg.sparse,
        )

    def read_more(self, path: Path) -> list[AnyMessage]:
        """The new messages of ``path`` since the last call (all of them the first time)."""
        reader = self.readers.get(path)
        if reader is None:
            reader = self.readers[path] = SessionReader(path)
        report = self.reports.setdefault(path, FileReport(path))
        out = list(
            self._unique_of(
                report, reader.messages(self.offsets.get(path, HEADER_SIZE), on_error="skip")
            )
        )
        report.update(reader)
        if reader.last_scan is not None:
            self.offsets[path] = reader.last_scan.end
        return out

    def read_more_or_note(self, path: Path) -> list[AnyMessage]:
        """:meth:`read_more`, but a file that cannot be opened as a session (not one, shorter
        than the header, a format version too new, unreadable) gives nothing and is noted in
        :attr:`unopened` with why; it is tried again on the next call (a file being created)."""
        try:
            out = self.read_more(path)
        except (SessionError, OSError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.unopened[path] = why.removeprefix(f"{path}: ")
            return []
        self.unopened.pop(path, None)
        return out

    def _unique_of(self, report: FileReport, msgs: Iterable[AnyMessage]) -> Iterator[AnyMessage]:
        for msg in msgs:
            report.messages += 1
            if msg.run not in report.runs:
                report.runs.append(msg.run)
            self._files_of.setdefault(msg.run, set()).add(report.path)
            kept = self.unique(msg)
            if kept is None:
                report.duplicates += 1
                continue
            yield kept

    def read(self, path: Path, *, note: bool = False) -> FileReport | None:
        """Read the whole of ``path`` into the merge; return its report.

        With ``note``, a file that cannot be opened as a session is left out and noted in
        :attr:`unopened` (:meth:`read_more_or_note`), and None is returned for it.
        """
        msgs = self.read_more_or_note(path) if note else self.read_more(path)
        for msg in msgs:
            self._by_run.setdefault(msg.run, []).append(msg)
        return None if path in self.unopened else self.reports[path]

    def files_of(self, run: str) -> list[Path]:
        """The files that hold ``run``, in the order they were read."""
        have = self._files_of.get(run, set())
        return [p for p in self.reports if p in have]

    def messages(self) -> list[AnyMessage]:
        """Every message read, run by run (in order of first appearance); a run found in more
        than one file in ``seq`` order, else in file order."""
        out: list[AnyMessage] = []
        for run, msgs in self._by_run.items():
            if len(self._files_of.get(run, ())) > 1:
                msgs = sorted(msgs, key=lambda m: m.seq)
            out.extend(msgs)
        return out

    @property
    def duplicates(self) -> int:
        return sum(r.duplicates for r in self.reports.values())

    def notes(self, *, names: bool = False, unopened: bool = True) -> list[str]:
        """Every file's warnings (file names only with ``names``; the files not opened first,
        unless not ``unopened``), then the merged runs."""
        out = self.unopened_notes(names=names) if unopened else []
        for path, report in self.reports.items():
            out += report.notes(path.name if names else None)
        for run in self._by_run:
            files = self.files_of(run)
            if len(files) > 1:
                shown = ", ".join(p.name if names else str(p) for p in files)
                out.append(f"run {run} is in {len(files)} files ({shown}): merged by seq")
        return out

    def unopened_notes(self, *, names: bool = False) -> list[str]:
        """``<file> not opened: <why>`` for each file left out as not a session."""
        return [f"{p.name if names else p} not opened: {why}" for p, why in self.unopened.items()]


def read_sessions(
    paths: Sequence[str | os.PathLike[str]], *, skip_unopened: bool = False
) -> tuple[list[AnyMessage], SessionMerge]:
    """Read and merge session files (see the module).

    Args:
        paths: The files.
        skip_unopened: Leave out a file that cannot be opened as a session (not one, shorter
            than the header, a format version too new, unreadable) and read the others; each
            left out is in the merge's :attr:`SessionMerge.unopened` with why (and its notes).

    Returns:
        The messages and the merge (its reports and notes).

    Raises:
        SessionError: Without ``skip_unopened``, a file that is not a session (wrong magic,
            format version).
    """
    merge = SessionMerge()
    for p in paths:
        merge.read(Path(p), note=skip_unopened)
    return merge.messages(), merge
