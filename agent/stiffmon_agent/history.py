"""What the agent keeps for late joiners: every message but heartbeats, in few messages.

A snapshot has to be short in messages, not only in bytes: a client pays some 40 µs for each one
(send, decode, bookkeeping), so 20,000 small messages take a second. So the history keeps:

* every step's per-step scalars: the live ``columns`` batches appended into chunks of up to
  65,536 steps (:class:`ColumnHistory`, 16–40 bytes per step);
* the values of ``scalars`` messages (measurement results, coverage counts, ``Agent.log``), one
  column per name, served as ``sparse`` ``columns`` messages (:class:`ScalarHistory`, 32 bytes
  per value held): each row keeps its message's ``seq`` as its batch, so a client that already
  has some of them keeps only the rest;
* heavy messages (hello, matrices, curves, spectra, events, bye) as they were published.

Chunks and other messages interleave in ``seq`` (the coverage counts of a due step come between
two per-step batches). A snapshot is ordered by each item's *first* ``seq``, and a client checks
what is new against what it had before the snapshot, not against the snapshot's previous message
(:mod:`stiffmon.client`). A name is never held by two open streams at once (the per-step chunk
is cut when a ``scalars`` message brings one of its names, and a name's sparse column is closed
when a per-step batch brings it), and a name's column is closed when its step goes back, so every
series reaches a late joiner in the order it was published.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np
import numpy.typing as npt

from stiffmon import protocol as p

HISTORY_CHUNK_ROWS = 1 << 16
"""Rows per ``columns`` message in the history served to late joiners."""

Item = tuple[int, list[bytes]]
"""A kept message: (its first ``seq``, its frames)."""


def _grown(a: npt.NDArray[Any], n: int, cap: int) -> npt.NDArray[Any]:
    """A new array of ``cap`` elements holding ``a``'s first ``n``."""
    b = np.empty(cap, a.dtype)
    b[:n] = a[:n]
    return b


class ColumnHistory:
    """Every step's scalars for late joiners, compacted into large ``columns`` messages.

    Live batches are small (~0.25 s of steps); kept as they are, a long run at a few ms per step
    would hand a late joiner hundreds of thousands of messages. Here consecutive batches with
    the same names are appended (vectorised, amortised O(rows)) to an open chunk of up to
    ``chunk_rows`` steps; a full chunk is encoded once and kept as its frames. A chunk is a
    ``columns`` message joining its batches: its ``seq`` is its last batch's and it lists every
    batch's ``seq`` and last row, so a client that already has some of them takes only the rest
    (:meth:`stiffmon.protocol.Columns.after`). Nothing is ever decimated: memory is the encoded
    size, about 16–40 bytes per step (and 16 per batch).

    Args:
        run: Run id of the messages.
        chunk_rows: Steps per chunk at most.
    """

    def __init__(self, run: str, chunk_rows: int = HISTORY_CHUNK_ROWS) -> None:
        self.run = run
        self.chunk_rows = max(1, chunk_rows)
        self.closed: list[Item] = []  # (first seq, frames), in seq order
        self.names: tuple[str, ...] = ()  # of the open chunk
        self._cols: list[npt.NDArray[Any]] = []  # steps, times, one array per name
        self._n = 0
        self._batch_seqs: list[int] = []  # seq of each batch in the open chunk
        self._batch_ends: list[int] = []  # its end row
        self._open_frames: Item | None = None  # cache of the open chunk
        self.rows = 0

    def add(self, msg: p.Columns) -> None:
        """Append a batch (its arrays are copied)."""
        k = len(msg)
        if self._n and (
            msg.names != self.names
            or self._n + k > self.chunk_rows
            or int(msg.steps[0]) < int(self._cols[0][self._n - 1])  # the steps went back
        ):
            self.cut()
        if not self._n:
            self.names = msg.names
            cap = min(max(k, 1024), max(self.chunk_rows, k))
            self._cols = [np.empty(cap, np.int64)] + [
                np.empty(cap, np.float64) for _ in range(1 + len(msg.names))
            ]
        need = self._n + k
        if need > self._cols[0].shape[0]:
            cap = max(need, min(2 * self._cols[0].shape[0], self.chunk_rows))
            self._cols = [_grown(a, self._n, cap) for a in self._cols]
        for a, src in zip(self._cols, (msg.steps, msg.times, *msg.values), strict=True):
            a[self._n : need] = src
        seqs, ends = msg.batches()
        self._batch_seqs += seqs.tolist()
        self._batch_ends += (ends + self._n).tolist()
        self._n = need
        self._open_frames = None
        self.rows += k
        if self._n >= self.chunk_rows:
            self.cut()

    def _encode_open(self) -> Item:
        if self._open_frames is None:
            n = self._n
            steps, times, *values = (a[:n] for a in self._cols)
            msg = p.Columns.from_columns(
                dict(zip(self.names, values, strict=True)),
                steps,
                times,
                run=self.run,
                seq=self._batch_seqs[-1],
                batch_seqs=self._batch_seqs,
                batch_ends=self._batch_ends,
            )
            self._open_frames = (self._batch_seqs[0], p.encode(msg))
        return self._open_frames

    def cut(self) -> None:
        """Close the open chunk: later batches go to a new one."""
        if self._n:
            self.closed.append(self._encode_open())
        self._n = 0
        self.names = ()
        self._cols = []
        self._batch_seqs, self._batch_ends = [], []
        self._open_frames = None

    def in_order(self) -> list[Item]:
        """``(first seq, frames)`` of every chunk, oldest first (the open one encoded on demand)."""
        return self.closed + ([self._encode_open()] if self._n else [])

    @property
    def nbytes(self) -> int:
        """Bytes held by the encoded chunks and the open chunk's arrays."""
        held = sum(len(f) for _, frames in self.closed for f in frames)
        return held + sum(a.nbytes for a in self._cols) + 16 * len(self._batch_seqs)


class _Values:
    """One stretch of one name's values: rows ``(step, t, value, seq)``, amortised growth."""

    __slots__ = ("n", "seqs", "steps", "times", "values")

    def __init__(self, cap: int = 16) -> None:
        self.steps = np.empty(cap, np.int64)
        self.times = np.empty(cap, np.float64)
        self.values = np.empty(cap, np.float64)
        self.seqs = np.empty(cap, np.int64)
        self.n = 0

    def append(self, step: int, t: float, value: float, seq: int) -> None:
        n = self.n
        if n == self.steps.shape[0]:
            cap = n + max(16, n // 2)
            for name in self.__slots__[1:]:
                setattr(self, name, _grown(getattr(self, name), n, cap))
        self.steps[n] = step
        self.times[n] = t
        self.values[n] = value
        self.seqs[n] = seq
        self.n = n + 1

    def keep(self, mask: npt.NDArray[np.bool_]) -> None:
        """Keep the rows where ``mask`` (one per row) is true."""
        for name in self.__slots__[1:]:
            setattr(self, name, getattr(self, name)[: self.n][mask])
        self.n = int(self.steps.shape[0])


class ScalarHistory:
    """The values of every ``scalars`` message, one sparse column per name, for late joiners.

    Published one message per measurement or due step, they would make a long run's snapshot
    tens of thousands of messages (coverage counts every 50 steps: 20,000 in a 1M-step run).
    Kept as columns they make a few ``columns`` messages (``sparse``) per name, each row its own
    batch with its message's ``seq``. When more than ``max_values`` values are held, the name
    holding the most is thinned, its older values evenly spread (:meth:`_thin`); memory is ~32
    bytes per value held.

    Args:
        run: Run id of the messages.
        max_values: Values kept at most, over all names.
        chunk_rows: Rows per served message at most.
    """

    def __init__(
        self, run: str, max_values: int = 1_000_000, chunk_rows: int = HISTORY_CHUNK_ROWS
    ) -> None:
        self.run = run
        self.max_values = max(2, max_values)
        self.chunk_rows = max(1, chunk_rows)
        self._names: dict[str, list[_Values]] = {}  # stretches per name, in seq order
        self.open: set[str] = set()  # names whose last stretch takes more values
        self.values = 0
        self.thinned = 0

    @staticmethod
    def accepts(msg: p.Scalars) -> bool:
        """Whether the message can be kept as columns (names present and distinct)."""
        return bool(msg.names) and len(set(msg.names)) == len(msg.names)

    def add(self, msg: p.Scalars) -> None:
        """Append the message's values (see :meth:`accepts`)."""
        for name, value in zip(msg.names, msg.values.tolist(), strict=True):
            stretches = self._names.get(name)
            if stretches is None:
                stretches = self._names[name] = []
            last = stretches[-1] if stretches else None
            if last is None or name not in self.open or msg.step < int(last.steps[last.n - 1]):
                last = _Values()
                stretches.append(last)
                self.open.add(name)
            last.append(msg.step, msg.t, value, msg.seq)
        self.values += len(msg.names)
        while self.values > self.max_values and self._thin():
            pass

    def close(self, names: tuple[str, ...]) -> None:
        """Later values of ``names`` start new stretches (another stream took these names)."""
        self.open.difference_update(names)

    def _thin(self) -> int:
        """Thin the name holding the most values by a quarter; return how many went.

        The newest quarter is kept whole (a client re-syncing after a gap must find what it
        missed); of the rest, the values nearest to evenly spaced ``seq`` s are kept, as many as
        half the name's values. As the run grows the grid only gets coarser, so repeated
        thinning leaves the older values evenly spread over the run, not ever sparser towards
        its start.
        """
        name = max(self._names, key=lambda k: sum(s.n for s in self._names[k]))
        stretches = self._names[name]
        seqs = np.concatenate([s.seqs[: s.n] for s in stretches])  # increasing
        total = int(seqs.shape[0])
        half = total - total // 4  # the older part
        if total // 4 < 1:
            return 0
        targets = np.linspace(float(seqs[0]), float(seqs[half - 1]), total // 2)
        mask = np.zeros(total, np.bool_)
        mask[np.searchsorted(seqs[:half], targets)] = True  # the first at or after each target
        mask[half:] = True
        start = 0
        for s in stretches:
            n = s.n
            s.keep(mask[start : start + n])
            start += n
        self._names[name] = [s for s in stretches if s.n]  # the newest, open one stays
        removed = total - int(mask.sum())
        self.values -= removed
        self.thinned += removed
        return removed

    def stretches(self) -> list[tuple[str, list[_Values]]]:
        """Each name's stretches of values, in ``seq`` order (read only)."""
        return list(self._names.items())

    def in_order(self) -> list[Item]:
        """``(first seq, frames)`` of every served message, in first-``seq`` order."""
        out: list[Item] = []
        for name, stretches in self._names.items():
            for s in stretches:
                for a in range(0, s.n, self.chunk_rows):
                    b = min(a + self.chunk_rows, s.n)
                    msg = p.Columns.from_columns(
                        {name: s.values[a:b]},
                        s.steps[a:b],
                        s.times[a:b],
                        run=self.run,
                        seq=int(s.seqs[b - 1]),
                        batch_seqs=s.seqs[a:b],
                        batch_ends=np.arange(1, b - a + 1),
                        sparse=True,
                    )
                    out.append((int(s.seqs[a]), p.encode(msg)))
        out.sort(key=lambda item: item[0])
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        return sum(32 * s.steps.shape[0] for ss in self._names.values() for s in ss)


class History:
    """What a late joiner gets: every message but heartbeats (see the module).

    Args:
        run: Run id of the messages.
        max_values: Bound on the ``scalars`` values kept (:class:`ScalarHistory`).
    """

    def __init__(self, run: str, max_values: int) -> None:
        self.heavy: list[Item] = []
        self.columns = ColumnHistory(run)
        self.scalars = ScalarHistory(run, max_values)

    def add(self, msg: p.Message, frames: list[bytes]) -> None:
        """Keep a published message (its frames, or its values)."""
        if isinstance(msg, p.Columns) and not msg.sparse:
            if self.scalars.open and not self.scalars.open.isdisjoint(msg.names):
                self.scalars.close(msg.names)
            self.columns.add(msg)
        elif isinstance(msg, p.Scalars) and self.scalars.accepts(msg):
            if self.columns.names and not set(msg.names).isdisjoint(self.columns.names):
                self.columns.cut()
            self.scalars.add(msg)
        else:
            self.heavy.append((msg.seq, frames))

    def in_order(self) -> list[Item]:
        """Every kept message, by first ``seq`` (what a snapshot sends)."""
        return list(
            heapq.merge(
                self.heavy,
                self.columns.in_order(),
                self.scalars.in_order(),
                key=lambda item: item[0],
            )
        )

    def frames(self) -> list[list[bytes]]:
        """The encoded messages, in first-``seq`` order."""
        return [frames for _, frames in self.in_order()]
