"""Derived quantities computed on the monitor side, so they work on live runs and replays alike.

* Break-even point (Jastrzebski et al. 2020): the first measured step at which λ1_H reaches the
  run's stability threshold (2/η for SGD, see the agent's sharpness module). If it never does,
  the step of the early-phase peak of λ1_H: the first running maximum that is followed by a
  drop of at least ``drop`` (default 10 %) — the point where sharpening stops — or, if λ1_H never
  drops that much, its global maximum.
* Debiased exponential moving average, as TensorBoard's smoothing slider: with weight w,
  last ← w·last + (1 − w)·v and the output last / (1 − w^k) after k finite values; non-finite
  values pass through unchanged and do not enter the average.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class BreakEven:
    """Where a run reaches its break-even point.

    Attributes:
        step: The step, or None if λ1_H was never measured.
        value: λ1_H at that step.
        reason: ``"threshold"`` (λ1_H ≥ threshold) or ``"peak"`` (early-phase peak).
    """

    step: int | None
    value: float
    reason: str


def break_even(
    steps: Sequence[int] | npt.NDArray[np.int64],
    lambda1: Sequence[float] | npt.NDArray[np.float64],
    thresholds: Sequence[float] | npt.NDArray[np.float64] | float | None,
    *,
    drop: float = 0.1,
) -> BreakEven:
    """Break-even step of one run from its sharpness measurements.

    Args:
        steps: Measured steps, increasing.
        lambda1: λ1_H at those steps (NaN for a failed measurement).
        thresholds: Stability threshold at each step (learning-rate schedules change it), one
            value for all, or None / NaN where no threshold applies.
        drop: Relative drop after a running maximum that marks the early-phase peak.
    """
    st = np.asarray(steps, dtype=np.int64)
    lam = np.asarray(lambda1, dtype=np.float64)
    if st.shape != lam.shape:
        raise ValueError("steps and lambda1 differ in length")
    finite = np.isfinite(lam)
    if not finite.any():
        return BreakEven(None, math.nan, "none")
    if thresholds is None or isinstance(thresholds, int | float):
        thr = np.full(lam.shape, math.nan if thresholds is None else float(thresholds))
    else:
        thr = np.asarray(thresholds, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        crossed = finite & np.isfinite(thr) & (lam >= thr)
    if crossed.any():
        i = int(np.argmax(crossed))
        return BreakEven(int(st[i]), float(lam[i]), "threshold")
    fin_st, fin = st[finite], lam[finite]
    running = np.maximum.accumulate(fin)
    dropped = fin <= (1.0 - drop) * running
    stop = int(np.argmax(dropped)) if dropped.any() else len(fin)
    best = int(np.argmax(fin[:stop])) if stop else int(np.argmax(fin))
    return BreakEven(int(fin_st[best]), float(fin[best]), "peak")


def peak(values: Sequence[float] | npt.NDArray[np.float64]) -> float:
    """Largest finite value, NaN if there is none."""
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    return float(finite.max()) if finite.size else math.nan


def ema(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard-style debiased exponential moving average (weight in [0, 1))."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out: list[float] = []
    last, k = 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        last = last * weight + (1.0 - weight) * v
        k += 1
        out.append(last / (1.0 - weight**k))
    return out


def lr_over_batch(lr: float | None, batch_size: int | None) -> float:
    """η / B, the ratio that sets the width of the minima SGD finds (Jastrzebski et al. 2017)."""
    if lr is None or not batch_size:
        return math.nan
    return lr / batch_size
