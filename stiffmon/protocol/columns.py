"""The ``columns`` kind (protocol version 2): the message and its wire form.

On the wire a column may be shortened to one element (see :class:`Columns`); the helpers here
shorten on encoding and expand on decoding.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from stiffmon.protocol.errors import ProtocolError
from stiffmon.protocol.limits import MAX_COLUMN_ROWS, MAX_INT, Array
from stiffmon.protocol.messages import Message, Scalars
from stiffmon.protocol.validate import (
    _arrays_equal,
    _check_range,
    _decode_array,
    _get,
    _get_str_tuple,
)


@dataclass(frozen=True, eq=False)
class Columns(Message):
    """Per-step scalars of many consecutive steps, one array per name (protocol version 2).

    The agent sends the cheap every-step values (loss, lr, momentum, accuracy ...) this way: one
    message per ~0.25 s or per few thousand steps instead of one per step. ``step`` and ``t`` of
    the message are those of its last row; ``first_step`` (in the header) is ``steps[0]``.

    On the wire a column may be shortened to one element: a value column of length 1 stands for
    that value at every row, a ``steps`` array of length 1 for consecutive steps from it. In
    memory every array has one element per row.

    A message may join several batches the agent published (its history served to late joiners
    does): ``batch_seqs`` holds each batch's ``seq`` (increasing, the last one is the message's
    ``seq``) and ``batch_ends`` the row where each ends. A client that already has some of them
    keeps only the rest (:meth:`after`), so no row is delivered twice and none is skipped. Both
    empty (the usual live batch) means one batch: the message itself.

    A ``sparse`` message (``"sparse": true`` in the header) holds values logged at some steps
    only, not a per-step stream: the history joins ``scalars`` messages of one name this way, one
    batch per message. A monitor derives no step times from its rows.

    Attributes:
        names: Names of the columns, e.g. ``("loss", "lr/0")``.
        steps: 1-D int64 array, the step of each row (non-decreasing).
        times: 1-D float64 array, unix time of each row.
        values: One 1-D float64 array per name, one value per row (NaN and ±Inf allowed).
        batch_seqs: 1-D int64 array, the ``seq`` of each joined batch (empty: one batch).
        batch_ends: 1-D int64 array, the row after each joined batch's last (empty: one batch).
        sparse: The rows are values at some steps, not every step's.
    """

    KIND: ClassVar[str] = "columns"

    names: tuple[str, ...] = ()
    steps: Array = field(default_factory=lambda: np.zeros(0, np.int64))
    times: Array = field(default_factory=lambda: np.zeros(0, np.float64))
    values: tuple[Array, ...] = ()
    batch_seqs: Array = field(default_factory=lambda: np.zeros(0, np.int64))
    batch_ends: Array = field(default_factory=lambda: np.zeros(0, np.int64))
    sparse: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "steps", np.asarray(self.steps, dtype=np.int64).reshape(-1))
        object.__setattr__(self, "times", np.asarray(self.times, dtype=np.float64).reshape(-1))
        object.__setattr__(
            self,
            "values",
            tuple(np.asarray(v, dtype=np.float64).reshape(-1) for v in self.values),
        )
        for name in ("batch_seqs", "batch_ends"):
            object.__setattr__(
                self, name, np.asarray(getattr(self, name), dtype=np.int64).reshape(-1)
            )

    def __len__(self) -> int:
        return int(self.steps.shape[0])

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Columns)
        head = (self.run, self.seq, self.step, self.names, self.sparse)
        if head != (other.run, other.seq, other.step, other.names, other.sparse) or not (
            self.t == other.t or (math.isnan(self.t) and math.isnan(other.t))
        ):
            return False
        pairs = [(self.steps, other.steps), (self.times, other.times)]
        pairs += list(zip(self.values, other.values, strict=False))
        pairs += list(zip(self.batches(), other.batches(), strict=True))
        return len(self.values) == len(other.values) and all(_arrays_equal(a, b) for a, b in pairs)

    __hash__ = None

    @classmethod
    def from_columns(
        cls,
        columns: Mapping[str, npt.ArrayLike],
        steps: npt.ArrayLike,
        times: npt.ArrayLike,
        *,
        run: str,
        seq: int,
        batch_seqs: npt.ArrayLike = (),
        batch_ends: npt.ArrayLike = (),
        sparse: bool = False,
    ) -> Columns:
        """Build a message from ``{name: values}``; ``step`` and ``t`` come from the last row.

        ``batch_seqs``/``batch_ends`` describe joined batches (see the class); a single batch
        is stored as none. ``sparse``: values at some steps only (see the class).
        """
        st = np.asarray(steps, dtype=np.int64).reshape(-1)
        ts = np.asarray(times, dtype=np.float64).reshape(-1)
        if st.shape[0] == 0:
            raise ValueError("a columns message needs at least one row")
        bs = np.asarray(batch_seqs, dtype=np.int64).reshape(-1)
        be = np.asarray(batch_ends, dtype=np.int64).reshape(-1)
        return cls(
            run=run,
            seq=seq,
            step=int(st[-1]),
            t=float(ts[-1]),
            names=tuple(columns),
            steps=st,
            times=ts,
            values=tuple(np.asarray(v, dtype=np.float64) for v in columns.values()),
            batch_seqs=bs if bs.shape[0] > 1 else np.zeros(0, np.int64),
            batch_ends=be if bs.shape[0] > 1 else np.zeros(0, np.int64),
            sparse=sparse,
        )

    def batches(self) -> tuple[Array, Array]:
        """``(seqs, ends)`` of the joined batches (one batch: ``([seq], [len])``)."""
        if self.batch_seqs.shape[0]:
            return self.batch_seqs, self.batch_ends
        return np.array([self.seq], np.int64), np.array([len(self)], np.int64)

    def after(self, seq: int) -> Columns | None:
        """The rows of the batches whose ``seq`` is above ``seq`` (None if there are none).

        Returns ``self`` when every batch is above it; the result keeps this message's ``seq``
        (its last batch's), so it comes out once, in ``seq`` order, whatever a client had.
        """
        if seq >= self.seq:
            return None
        seqs, ends = self.batches()
        keep = int(np.searchsorted(seqs, seq, side="right"))  # first batch above seq
        if keep == 0:
            return self
        start = int(ends[keep - 1])
        return Columns.from_columns(
            {n: v[start:] for n, v in zip(self.names, self.values, strict=True)},
            self.steps[start:],
            self.times[start:],
            run=self.run,
            seq=self.seq,
            batch_seqs=seqs[keep:],
            batch_ends=ends[keep:] - start,
            sparse=self.sparse,
        )

    def column(self, name: str) -> Array:
        """The values of one column (KeyError if absent)."""
        return self.values[self.names.index(name)]

    def rows(self) -> list[Scalars]:
        """The batch as one :class:`Scalars` message per row (all with this message's seq)."""
        vals = np.stack(self.values, axis=1) if self.values else np.zeros((len(self), 0))
        return [
            Scalars(run=self.run, seq=self.seq, step=s, t=t, names=self.names, values=vals[i])
            for i, (s, t) in enumerate(zip(self.steps.tolist(), self.times.tolist(), strict=True))
        ]


def _wire_column(a: Array, runs: bool) -> Array:
    """Shorten a column to one element where the wire allows it (see :class:`Columns`)."""
    n = a.shape[0]
    if n > 1:
        if runs and a[-1] - a[0] == n - 1 and bool((np.diff(a) == 1).all()):
            return a[:1]
        if not runs:
            bits = a.view(np.int64)  # bitwise: keeps -0.0 and NaN payloads apart
            if bool((bits == bits[0]).all()):
                return a[:1]
    return a


def _check_batches(
    seqs: Array, ends: Array, seq: int, n: int, error: type[Exception] = ProtocolError
) -> None:
    """Raise ``error`` unless ``seqs``/``ends`` describe batches tiling ``n`` rows up to ``seq``."""
    kind = Columns.KIND
    if seqs.shape != ends.shape or seqs.shape[0] < 1:
        raise error(f"{kind}: batch_seqs and batch_ends need the same number (1+) of batches")
    if int(seqs[-1]) != seq or int(seqs[0]) < 0 or bool((np.diff(seqs) <= 0).any()):
        raise error(f"{kind}: batch seqs must increase from 0 or more up to the seq {seq}")
    if int(ends[-1]) != n or int(ends[0]) < 1 or bool((np.diff(ends) <= 0).any()):
        raise error(f"{kind}: batch ends must increase from 1 or more up to the {n} rows")


def _encode_columns(msg: Columns, header: dict[str, Any]) -> list[bytes]:
    n = len(msg)
    if n == 0 or n > MAX_COLUMN_ROWS:
        raise ValueError(f"columns: {n} rows, need 1 to {MAX_COLUMN_ROWS}")
    if len(msg.values) != len(msg.names):
        raise ValueError(f"columns: {len(msg.names)} names but {len(msg.values)} value arrays")
    if msg.times.shape[0] != n or any(v.shape[0] != n for v in msg.values):
        raise ValueError(f"columns: every array needs {n} elements (one per step)")
    if int(msg.steps[0]) < 0 or bool((np.diff(msg.steps) < 0).any()):
        raise ValueError("columns: steps must be non-negative and non-decreasing")
    if int(msg.steps[-1]) != int(msg.step):
        raise ValueError(f"columns: step {msg.step} is not the last row's step {msg.steps[-1]}")
    if not bool(np.isfinite(msg.times).all()):
        raise ValueError("columns: times must be finite")
    arrays = [_wire_column(msg.steps, True), msg.times]
    arrays += [_wire_column(v, False) for v in msg.values]
    if msg.batch_seqs.shape[0]:
        _check_batches(msg.batch_seqs, msg.batch_ends, msg.seq, n, ValueError)
        arrays += [msg.batch_seqs, msg.batch_ends]
        header["batches"] = int(msg.batch_seqs.shape[0])
    if msg.sparse:
        header["sparse"] = True
    header["arrays"] = [{"dtype": a.dtype.str, "shape": [a.shape[0]]} for a in arrays]
    header["names"] = list(msg.names)
    header["first_step"] = int(msg.steps[0])
    try:
        text = json.dumps(header, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot encode columns header: {exc}") from exc
    header_bytes = text.encode("utf-8")
    return [msg.topic, header_bytes, *(a.tobytes() for a in arrays)]


def _decode_columns(
    h: Mapping[str, Any],
    buffers: Sequence[bytes | bytearray | memoryview],
    run: str,
    seq: int,
    step: int,
    t: float,
) -> Columns:
    kind = Columns.KIND
    names = _get_str_tuple(h, "names", kind)
    first_step = _check_range(_get(h, "first_step", int, kind), "first_step", kind)
    specs = _get(h, "arrays", list, kind)
    nbatches = 0
    if "batches" in h:
        nbatches = _check_range(_get(h, "batches", int, kind), "batches", kind, 1)
    extra = 2 if nbatches else 0
    sparse = _get(h, "sparse", bool, kind) if "sparse" in h else False
    if len(specs) != 2 + len(names) + extra:
        raise ProtocolError(
            f"{kind}: header describes {len(specs)} arrays, steps + times + {len(names)} names "
            f"{'+ 2 batch arrays ' if extra else ''}need {2 + len(names) + extra}"
        )
    if len(buffers) != len(specs):
        raise ProtocolError(
            f"{kind}: header describes {len(specs)} arrays, got {len(buffers)} buffers"
        )
    arrays = [
        _decode_array(spec, buf, i, kind)
        for i, (spec, buf) in enumerate(zip(specs, buffers, strict=True))
    ]
    batch_arrays = arrays[len(arrays) - extra :]
    arrays = arrays[: len(arrays) - extra]
    for a in batch_arrays:
        if a.ndim != 1 or a.dtype.str != "<i8" or a.shape[0] != nbatches:
            raise ProtocolError(
                f"{kind}: batch arrays must be 1-D <i8 of {nbatches}, got {a.dtype.str}{a.shape}"
            )
    for i, (a, want) in enumerate(zip(arrays, ["<i8"] + ["<f8"] * (len(arrays) - 1), strict=True)):
        if a.ndim != 1 or a.dtype.str != want:
            raise ProtocolError(
                f"{kind}: arrays[{i}] must be 1-D {want}, got {a.dtype.str}{a.shape}"
            )
    times = arrays[1]
    n = times.shape[0]
    if not 1 <= n <= MAX_COLUMN_ROWS:
        raise ProtocolError(f"{kind}: {n} rows, need 1 to {MAX_COLUMN_ROWS}")
    if not bool(np.isfinite(times).all()):
        raise ProtocolError(f"{kind}: times must be finite")
    for i, a in enumerate(arrays):
        if a.shape[0] not in (1, n):
            raise ProtocolError(f"{kind}: arrays[{i}] has {a.shape[0]} elements for {n} rows")
    steps = arrays[0]
    if steps.shape[0] != n:  # consecutive steps from steps[0]
        if int(steps[0]) > MAX_INT - n:
            raise ProtocolError(f"{kind}: steps from {int(steps[0])} overflow int64")
        steps = steps[0] + np.arange(n, dtype=np.int64)
    if int(steps[0]) != first_step or int(steps[-1]) != step:
        raise ProtocolError(
            f"{kind}: steps run from {int(steps[0])} to {int(steps[-1])}, the header says "
            f"{first_step} to {step}"
        )
    if int(steps[0]) < 0 or bool((np.diff(steps) < 0).any()):
        raise ProtocolError(f"{kind}: steps must be non-negative and non-decreasing")
    values = tuple(a if a.shape[0] == n else np.full(n, a[0]) for a in arrays[2:])
    if batch_arrays:
        _check_batches(batch_arrays[0], batch_arrays[1], seq, n)
    return Columns(
        run=run,
        seq=seq,
        step=step,
        t=t,
        names=names,
        steps=steps,
        times=times,
        values=values,
        batch_seqs=batch_arrays[0] if batch_arrays else np.zeros(0, np.int64),
        batch_ends=batch_arrays[1] if batch_arrays else np.zeros(0, np.int64),
        sparse=sparse,
    )
