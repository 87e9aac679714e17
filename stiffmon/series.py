"""A scalar series with bounded memory: min/max decimation keeps the spikes (no Textual here)."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt


class Series:
    """A scalar series (step, wall time, value) with bounded memory and min/max decimation."""

    __slots__ = ("_n", "_steps", "_times", "_values", "max_points", "stride")

    def __init__(self, max_points: int = 100_000) -> None:
        self.max_points = max(8, max_points)
        self._steps = np.empty(1024, dtype=np.int64)
        self._times = np.empty(1024, dtype=np.float64)
        self._values = np.empty(1024, dtype=np.float64)
        self._n = 0
        self.stride = 1  # how many raw points one kept point stands for, roughly

    def __len__(self) -> int:
        return self._n

    def append(self, step: int, t: float, value: float) -> None:
        if self._n == self._steps.shape[0]:
            cap = min(self._n * 2, self.max_points + 4)
            for name in ("_steps", "_times", "_values"):
                arr = getattr(self, name)
                new = np.empty(cap, dtype=arr.dtype)
                new[: self._n] = arr[: self._n]
                setattr(self, name, new)
        self._steps[self._n] = step
        self._times[self._n] = t
        self._values[self._n] = value
        self._n += 1
        if self._n > self.max_points:
            self._decimate()

    def extend(
        self,
        steps: npt.NDArray[np.int64],
        times: npt.NDArray[np.float64],
        values: npt.NDArray[np.float64],
    ) -> None:
        """Append many points at once (vectorised); decimates as :meth:`append` would."""
        k = int(steps.shape[0])
        if k == 0:
            return
        need = self._n + k
        if need > self._steps.shape[0]:
            cap = max(need, min(max(self._n * 2, 1024), self.max_points + 4))
            for name in ("_steps", "_times", "_values"):
                arr = getattr(self, name)
                new = np.empty(cap, dtype=arr.dtype)
                new[: self._n] = arr[: self._n]
                setattr(self, name, new)
        self._steps[self._n : need] = steps
        self._times[self._n : need] = times
        self._values[self._n : need] = values
        self._n = need
        while self._n > self.max_points:
            self._decimate()

    def _decimate(self) -> None:
        """Keep the min and the max (in step order) of every group of four points, and the first."""
        n = self._n - self._n % 4
        v = self._values[:n].reshape(-1, 4)
        nan = np.isnan(v)
        lo = np.argmin(np.where(nan, np.inf, v), axis=1)
        hi = np.argmax(np.where(nan, -np.inf, v), axis=1)
        same = lo == hi  # a flat (or all-NaN) group: keep two neighbours
        hi = np.where(same, np.where(lo < 3, lo + 1, lo - 1), hi)
        first, second = np.minimum(lo, hi), np.maximum(lo, hi)
        base = np.arange(v.shape[0]) * 4
        pairs = np.empty(2 * v.shape[0], dtype=np.int64)  # increasing: first < second < next base
        pairs[0::2], pairs[1::2] = base + first, base + second
        head = [] if pairs[0] == 0 else [0]  # the first point stays
        keep = np.concatenate([np.asarray(head, np.int64), pairs, np.arange(n, self._n)])
        m = keep.shape[0]
        self._steps[:m] = self._steps[keep]
        self._times[:m] = self._times[keep]
        self._values[:m] = self._values[keep]
        self._n = m
        self.stride *= 2

    @property
    def steps(self) -> npt.NDArray[np.int64]:
        return self._steps[: self._n]

    @property
    def times(self) -> npt.NDArray[np.float64]:
        return self._times[: self._n]

    @property
    def values(self) -> npt.NDArray[np.float64]:
        return self._values[: self._n]

    def last(self) -> float:
        """Last value (NaN if empty)."""
        return float(self._values[self._n - 1]) if self._n else math.nan


def last_or(series: Series | None, fallback: object) -> float:
    """The series' last value when it has one; else ``fallback`` (NaN when not a number)."""
    if series is not None and len(series):
        return series.last()
    return float(fallback) if isinstance(fallback, int | float) else math.nan
