"""Per-step scalars in columnar batches: the training thread appends, the publisher converts.

``Agent.step()`` used to hand one message per step to the publisher thread, which then spent
~100 µs of CPU on it (build, JSON header, send, record) and, in a fast loop, dropped most steps at
the bounded queue. Now the training thread only appends the step's raw values to the current batch
(:class:`ColumnBatcher`, amortised O(1), no conversion, so a GPU loss causes no synchronisation)
and hands the batch over as *one* queue item when it holds ``max_rows`` steps or is
``interval`` seconds old (the publisher thread also takes a batch that has gone stale because the
loop paused). The publisher thread turns a batch into one :class:`~stiffmon.protocol.Columns`
message (:func:`build_columns`): the tensors of a column are stacked and converted in one go,
the accuracies of a batch in a few small kernels (:mod:`~stiffmon_agent.accuracy`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from stiffmon import protocol as p
from stiffmon_agent.accuracy import Accuracy, accuracies, float_or_nan
from stiffmon_agent.gpu_readback import cuda_stream_of, stacked_float64

DEFAULT_MAX_ROWS = 8192
DEFAULT_INTERVAL = 0.25


@dataclass(frozen=True)
class RawColumns:
    """A batch as the training thread collected it: one ``(step, time, values)`` row per step.

    Attributes:
        names: Column names, the same for every row.
        rows: ``(step, unix time, raw values)`` of each step; the values (numbers, tensors,
            :class:`Accuracy`) one per name.
        stream: The CUDA stream the batch's first GPU values came from (None: no GPU values),
            on which they are read (:mod:`~stiffmon_agent.gpu_readback`).
    """

    names: tuple[str, ...]
    rows: list[tuple[int, float, Sequence[Any]]]
    stream: Any = None

    @property
    def steps(self) -> list[int]:
        """Step of each row."""
        return [r[0] for r in self.rows]

    @property
    def times(self) -> list[float]:
        """Unix time of each row."""
        return [r[1] for r in self.rows]


class ColumnBatcher:
    """Collect per-step scalars into batches on the training thread.

    Args:
        submit: Called with each full batch (from whichever thread closes it); returns False if
            the batch could not be queued (it is then counted in :attr:`dropped_steps`).
        max_rows: Steps per batch at most.
        interval: Seconds after its first step at which a batch is handed over.
    """

    def __init__(
        self,
        submit: Callable[[RawColumns], bool],
        *,
        max_rows: int = DEFAULT_MAX_ROWS,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self._submit = submit
        self.max_rows = max_rows
        self.interval = interval
        self._lock = threading.Lock()
        self._names: tuple[str, ...] = ()
        self._rows: list[tuple[int, float, Sequence[Any]]] = []
        self._started = 0.0
        self._stream: Any = None
        self.batches = 0
        self.dropped_steps = 0

    def add(self, step: int, t: float, names: tuple[str, ...], values: Sequence[Any]) -> None:
        """Append one step (amortised O(1), a few µs in a real loop); hand the batch over when
        it is full or old.

        A change of ``names`` (a new param group, accuracy passed or not) closes the batch first.
        """
        with self._lock:
            rows = self._rows
            if names is not self._names and names != self._names:
                if rows:
                    self._hand_over()
                    rows = self._rows
                self._names = names
            if not rows:
                self._started = t
                self._stream = cuda_stream_of(values)
            rows.append((step, t, values))
            if len(rows) >= self.max_rows or t - self._started >= self.interval:
                self._hand_over()

    def flush(self, older_than: float | None = None) -> None:
        """Hand the current batch over now, or only if it is ``older_than`` seconds old."""
        with self._lock:
            if self._rows and (older_than is None or time.time() - self._started >= older_than):
                self._hand_over()

    def __len__(self) -> int:
        return len(self._rows)

    def _hand_over(self) -> None:
        batch = RawColumns(self._names, self._rows, self._stream)
        self._rows = []
        self.batches += 1
        if not self._submit(batch):
            self.dropped_steps += len(batch.rows)


def _as_float64(
    column: Sequence[Any], stream: Any = None, problems: set[str] | None = None
) -> npt.NDArray[np.float64]:
    """Convert one column of raw values, vectorised where the values allow it (GPU values on
    ``stream``, without blocking); why accuracies failed goes to ``problems``."""
    first = column[0]
    try:
        if isinstance(first, float | int) and all(type(v) is type(first) for v in column):
            return np.array(column, dtype=np.float64)
        if isinstance(first, torch.Tensor):
            if first.numel() == 1:  # raises below if shapes or devices differ: one by one
                return stacked_float64(column, stream)
        kept = [i for i, v in enumerate(column) if isinstance(v, Accuracy)]
        if len(kept) == len(column):
            return accuracies(column, stream, problems)
        if kept:  # some steps' accuracies were NaN on the training thread already
            out = np.array(
                [math.nan if isinstance(v, Accuracy) else float_or_nan(v) for v in column]
            )
            out[kept] = accuracies([column[i] for i in kept], stream, problems)
            return out
    except Exception:  # shapes or devices differ: one by one below
        pass
    return np.array([float_or_nan(v) for v in column], dtype=np.float64)


def build_columns(
    raw: RawColumns, *, run: str, seq: int, problems: set[str] | None = None
) -> p.Columns:
    """Turn a collected batch into a ``columns`` message (on the publisher thread); why values
    could not be computed (an accuracy's shapes) is added to ``problems``."""
    steps, times, rows = zip(*raw.rows, strict=True)
    cols = list(zip(*rows, strict=True)) if raw.names else []
    values = {
        name: _as_float64(col, raw.stream, problems)
        for name, col in zip(raw.names, cols, strict=True)
    }
    return p.Columns.from_columns(values, steps, times, run=run, seq=seq)
