"""A long series decimates in linear time, keeping what the sorted-unique reference keeps.

Replaying a 5M-step file spent half of each seek (13 s of 26 s) in ``np.unique`` inside
:meth:`Series._decimate`: a hash of the kept indices every time a series halved itself, though
they are increasing by construction. The reference here is the old ``np.unique`` formula.
"""

from __future__ import annotations

import numpy as np

from stiffmon.series import Series


def _reference_keep(values: np.ndarray) -> np.ndarray:
    """Brute force: per group of four, the argmin and argmax (a flat group: two neighbours)."""
    keep = {0}
    for g in range(len(values) // 4):
        v = values[4 * g : 4 * g + 4]
        lo = int(np.argmin(np.where(np.isnan(v), np.inf, v)))
        hi = int(np.argmax(np.where(np.isnan(v), -np.inf, v)))
        if lo == hi:
            hi = lo + 1 if lo < 3 else lo - 1
        keep |= {4 * g + lo, 4 * g + hi}
    return np.array(sorted(keep) + list(range(len(values) // 4 * 4, len(values))))


def test_decimation_keeps_the_reference_points() -> None:
    rng = np.random.default_rng(0)
    for n in (9, 10, 37, 1001):
        values = rng.normal(size=n)
        values[rng.random(n) < 0.1] = np.nan
        values[8:12] = 1.5  # a flat group
        s = Series(max_points=8)
        s._steps = np.arange(n, dtype=np.int64) * 3
        s._times = np.arange(n, dtype=np.float64)
        s._values = values.copy()
        s._n = n
        s._decimate()
        keep = _reference_keep(values)
        assert np.array_equal(s.steps, keep * 3)
        assert np.array_equal(s.values, values[keep], equal_nan=True)


def test_a_long_series_stays_bounded_and_ends_at_its_last_step() -> None:
    """6M steps in agent-sized batches (the time it takes is a benchmark's business: 0.1–0.7 s
    here against 3.3 s with the sorted-unique step)."""
    s = Series(max_points=100_000)
    steps = np.arange(1000, dtype=np.int64)
    values = np.sin(steps * 0.37)
    for b in range(6000):
        s.extend(steps + 1000 * b, steps * 0.05, values)
    assert len(s) <= 100_000 and s.steps[-1] == 5_999_999 and s.steps[0] == 0
    assert np.all(np.diff(s.steps) > 0)
