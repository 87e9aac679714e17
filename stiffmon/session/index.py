"""The step → offset index of a session file and the fast record scan that builds it."""

from __future__ import annotations

import mmap
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from stiffmon.session.records import (
    _COLUMNS_TOPIC_END,
    _FIRST_STEP_RE,
    _MAX_STEP,
    _REC,
    _STEP_RE,
    _U32,
    HEADER_SIZE,
    MAX_RECORD_BYTES,
    TailState,
    find_record,
)


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
    mm: mmap.mmap,
    size: int,
    offsets: list[int],
    steps: list[int],
    firsts: list[int],
    damaged: list[tuple[int, int]] | None = None,
) -> tuple[int, TailState]:
    """Fill ``offsets``, ``steps`` and ``firsts`` (a record's first step: ``first_step`` of a
    ``columns`` batch, else its step) from a mapped session; return (end, tail state).

    A damaged record with an intact one after it is skipped and ``(offset, bytes skipped)``
    appended to ``damaged``; the scan stops at one without (the torn tail)."""
    pos, last_step = HEADER_SIZE, 0
    while True:
        pos, last_step, state = _scan_run(mm, size, pos, last_step, offsets, steps, firsts)
        if state == "clean":
            return pos, state
        nxt = find_record(mm, pos + 1, size)
        if nxt is None:
            return pos, state
        if damaged is not None:
            damaged.append((pos, nxt - pos))
        pos = nxt


def _scan_run(
    mm: mmap.mmap,
    size: int,
    pos: int,
    last_step: int,
    offsets: list[int],
    steps: list[int],
    firsts: list[int],
) -> tuple[int, int, TailState]:
    """The hot loop of :func:`_scan_index`: intact records from ``pos`` up to the first bad
    one; return (where it stopped, the last step, why)."""
    view = memoryview(mm)
    unpack = _REC.unpack_from
    u32 = _U32.unpack_from
    crc32 = zlib.crc32
    search = _STEP_RE.search
    add_offset, add_step, add_first = offsets.append, steps.append, firsts.append
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
    return pos, last_step, state


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
