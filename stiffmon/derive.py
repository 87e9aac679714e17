"""Derived quantities computed on the monitor side, so they work on live runs and replays alike.

**Break-even point** (Jastrzebski et al. 2020): the point early in training after which SGD
cannot go sharper; larger η / B reach it earlier, and stay flatter after it. :func:`break_even`
finds it from the measured λ1 (of H, or of the preconditioned H for adaptive optimizers) and the
run's stability threshold (2/η for plain SGD) with the rule below. Only finite measurements
count; ``i`` indexes them in order.

* *Threshold*: the first measurement of a run of at least ``persist`` consecutive measurements
  with λ1[i] ≥ (1 − ``tol``)·thr[i] (a sustained crossing: at the threshold within ``tol``, for
  measurement noise at the edge of stability; thr may change with a learning-rate schedule).
  A shorter run that holds a measurement with λ1[i] ≥ thr[i] is a *catapult* at that
  measurement (with the default ``persist = 2``: a one-measurement spike); every catapult is
  listed, and the first one is the marker (reason ``"catapult"``) unless one was confirmed
  before it. With thr[0] reached, the marker can be step 0; otherwise never.
* *Early peak* (when the threshold has not been reached): the curve is smoothed by a running
  median over ``window`` measurements, s[i] = median(λ1[i−h … i+h]), h = ``window`` // 2
  (truncated at the start), which ignores single-measurement spikes. The curve's noise is
  σ = 1.4826 · median |λ1[j+1] − 2λ1[j] + λ1[j−1]| / √6 over the last ``noise_window``
  measurements (second differences cancel a linear trend; the median ignores spikes), the larger
  of its values at the candidate and at the latest measurement (noise that grows after a peak
  must not make it look like a fall). A candidate peak p is the highest s since the lowest point
  b before it; it needs a real rise, s[p] − s[b] ≥ δ with δ = max(``noise_k`` · σ,
  ``rel`` · |s[p]|). The marker is where the
  rise ends: the first q in (b, p] with s[q] ≥ s[p] − ``noise_k`` · σ_s, where
  σ_s = 1.2533 σ(p) / √``window`` is the noise of the running median — so never the first
  measurement. It is confirmed by a sustained fall below the top level: s[i] < mean(s[q … p]) − δ
  for ``fall_persist`` consecutive measurements (the mean, not the maximum, so that a long noisy
  plateau does not confirm itself on its own noise).
* Whichever of these is confirmed first is the marker, status ``"confirmed"``. Every decision
  uses only the measurements up to the one that confirms it, so a confirmed marker never moves
  as data is appended, and live, replay and ``stiffmon summary`` agree.
* Unconfirmed, the marker is *tentative*: a threshold crossing awaiting its next measurement, or
  a candidate peak with a real rise that the smoothed curve has not exceeded for
  ``fall_persist`` measurements. Otherwise (no measurement, or λ1 still rising) there is none.

**Debiased exponential moving average**, as TensorBoard's smoothing slider: with weight w,
last ← w·last + (1 − w)·v and the output last / (1 − w^k) after k finite values; non-finite
values pass through unchanged and do not enter the average.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

LAMBDA1_H = "sharpness/lambda1_h"


def threshold_series(precond: bool) -> str:
    """The threshold series λ1_H (or, ``precond``, λ1(P⁻¹H)) is judged against."""
    return "sharpness/threshold_precond" if precond else "sharpness/threshold"


OPTIMIZER_SKIPPED = "optimizer/skipped"
"""Scalars: how many training steps so far had no optimizer step (``GradScaler`` skipped them)."""

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class BreakEven:
    """Where a run reaches its break-even point.

    Attributes:
        step: The step of the marker, or None when there is none (yet).
        value: λ1 measured at that step (NaN when there is no marker).
        reason: ``"threshold"`` (sustained λ1 ≥ threshold), ``"early-peak"`` (end of the rise
            to the early-phase peak), ``"catapult"`` (a one-measurement spike above the
            threshold) or ``"none"``.
        status: ``"confirmed"`` (never moves again), ``"tentative"`` or ``"none"``.
        catapults: Steps of every catapult seen, in order.
        series: Name of the series it was judged on.
    """

    step: int | None
    value: float
    reason: str
    status: str
    catapults: tuple[int, ...] = ()
    series: str = LAMBDA1_H

    @property
    def confirmed(self) -> bool:
        return self.status == "confirmed"


def no_break_even(series: str = LAMBDA1_H) -> BreakEven:
    """The answer for a run without measurements."""
    return BreakEven(None, math.nan, "none", "none", (), series)


def _medians(windows: FloatArray) -> FloatArray:
    """Median of each row, ignoring NaN padding (every row holds at least one number)."""
    rows = np.sort(windows, axis=1)  # NaN last
    count = np.sum(~np.isnan(windows), axis=1)
    r = np.arange(rows.shape[0])
    med: FloatArray = 0.5 * (rows[r, (count - 1) // 2] + rows[r, count // 2])
    return med


def _smooth(lam: FloatArray, h: int) -> FloatArray:
    """Running median over 2h+1 measurements, truncated at both ends."""
    pad = np.full(h, np.nan)
    return _medians(sliding_window_view(np.concatenate([pad, lam, pad]), 2 * h + 1))


def _noise(lam: FloatArray, window: int) -> FloatArray:
    """σ known at each measurement j: 1.4826 · median |second difference| / √6 over the last
    ``window`` measurements up to j (0 before there are three)."""
    n = lam.shape[0]
    out = np.zeros(n)
    if n < 3:
        return out
    d2 = np.abs(lam[2:] - 2.0 * lam[1:-1] + lam[:-2])  # d2[k] is known at measurement k + 2
    m = window - 2  # second differences inside a window of `window` measurements
    padded = np.concatenate([np.full(m - 1, np.nan), d2])  # fewer of them at the start
    out[2:] = _medians(sliding_window_view(padded, m))
    return out * (1.4826 / math.sqrt(6.0))


class _Peak:
    """Online early-peak search over the smoothed curve, one final point at a time."""

    def __init__(
        self,
        s: FloatArray,
        noise: FloatArray,
        *,
        noise_k: float,
        rel: float,
        fall_persist: int,
        window: int,
    ) -> None:
        self.arr = s  # the smoothed curve as an array (for slices) and as floats (per point)
        self.s: list[float] = s.tolist()
        self.noise: list[float] = noise.tolist()
        self.noise_k, self.rel, self.fall_persist = noise_k, rel, fall_persist
        self.median_se = 1.2533 / math.sqrt(window)  # σ of a median of `window` values, per σ
        self.base = 0  # lowest point before the candidate
        self.p: int | None = None  # candidate peak
        self.delta = math.inf
        self._top: tuple[int, float] | None = None  # (end of the rise, top level), per candidate
        self.below = 0  # consecutive points below the top level − δ
        self.since = 0  # points since the candidate was last exceeded

    def judge(self, j: int) -> None:
        """δ with the noise known at measurement j (the larger of that at p and at j)."""
        assert self.p is not None
        sigma = max(self.noise[self.p], self.noise[j])
        self.delta = max(self.noise_k * sigma, self.rel * abs(self.s[self.p]))

    def real_rise(self) -> bool:
        return self.p is not None and self.s[self.p] - self.s[self.base] >= self.delta

    def top(self) -> tuple[int, float]:
        """End of the rise q, the first i in (b, p] with s[i] ≥ s[p] − k·σ_s (σ_s the noise
        of the running median at p), and the top level, the mean of s over [q, p]."""
        if self._top is None:
            assert self.p is not None
            sigma_s = self.noise[self.p] * self.median_se
            seg = self.arr[self.base + 1 : self.p + 1]
            if not seg.size:
                self._top = (self.p, self.s[self.p])
            else:
                k = int(np.argmax(seg >= self.s[self.p] - self.noise_k * sigma_s))
                self._top = (self.base + 1 + k, float(seg[k:].mean()))
        return self._top

    def add(self, i: int, j: int) -> bool:
        """Take final point i, known at measurement j; True when it confirms the candidate."""
        s = self.s
        if self.p is not None:
            self.judge(j)
        if s[i] < s[self.base] and not self.real_rise():
            self.base, self.p = i, None
        if self.p is None or s[i] > s[self.p]:
            self.p, self.below, self.since, self._top = i, 0, 0, None
            self.judge(j)
            return False
        self.since += 1
        # the top level is at most s[p]: test the cheap bound first
        fell = s[i] < s[self.p] - self.delta and s[i] < self.top()[1] - self.delta
        self.below = self.below + 1 if fell else 0
        return self.real_rise() and self.below >= self.fall_persist


def break_even(
    steps: Sequence[int] | npt.NDArray[np.int64],
    lambda1: Sequence[float] | npt.NDArray[np.float64],
    thresholds: Sequence[float] | npt.NDArray[np.float64] | float | None,
    *,
    series: str = LAMBDA1_H,
    persist: int = 2,
    tol: float = 0.05,
    window: int = 5,
    noise_k: float = 3.0,
    rel: float = 0.1,
    fall_persist: int = 3,
    noise_window: int = 16,
    early_peak: bool = True,
) -> BreakEven:
    """Break-even point of one run from its sharpness measurements (rule in the module doc).

    Args:
        steps: Measured steps, increasing.
        lambda1: λ1 at those steps (NaN for a failed measurement).
        thresholds: Stability threshold at each step (learning-rate schedules change it), one
            value for all, or None / NaN where no threshold applies.
        series: Name of the series, carried into the result.
        persist: Measurements at or above the threshold band that make a crossing sustained.
        tol: Relative width of the band below the threshold that still counts as "at" it.
        window: Width of the running median (odd).
        noise_k: Noise multiples a rise, a fall and the end of a rise are judged with.
        rel: Smallest rise and fall, relative to the peak.
        fall_persist: Consecutive smoothed measurements below the peak that confirm it.
        noise_window: Measurements up to the candidate its noise is estimated on.
        early_peak: Whether the early-peak rule applies: not to measurements that start after
            the early phase (a run resumed from a checkpoint, without the run it continues).

    Returns:
        The marker, its reason and status, and all catapults.
    """
    if persist < 1 or fall_persist < 1 or window < 1 or window % 2 == 0 or noise_window < 3:
        raise ValueError("persist, fall_persist ≥ 1, window odd and noise_window ≥ 3 needed")
    st = np.asarray(steps, dtype=np.int64)
    lam = np.asarray(lambda1, dtype=np.float64)
    if st.shape != lam.shape:
        raise ValueError("steps and lambda1 differ in length")
    if thresholds is None or isinstance(thresholds, int | float):
        thr = np.full(lam.shape, math.nan if thresholds is None else float(thresholds))
    else:
        thr = np.asarray(thresholds, dtype=np.float64)
        if thr.shape != lam.shape:
            raise ValueError("thresholds and lambda1 differ in length")
    finite = np.isfinite(lam)
    st, lam, thr = st[finite], lam[finite], thr[finite]
    n = lam.shape[0]
    if n == 0:
        return no_break_even(series)
    h = window // 2
    s = _smooth(lam, h)
    peak = _Peak(
        s,
        _noise(lam, noise_window),
        noise_k=noise_k,
        rel=rel,
        fall_persist=fall_persist,
        window=window,
    )
    catapults: list[int] = []
    found: tuple[int, str] | None = None
    run: int | None = None  # first measurement of the current run at the threshold (within tol)
    length = 0
    hit: int | None = None  # first measurement of that run at or above the threshold itself
    lam_f: list[float] = lam.tolist()
    band: list[float] = ((1.0 - tol) * thr).tolist()
    thr_f: list[float] = thr.tolist()
    for j in range(n):
        if lam_f[j] >= band[j]:  # a NaN threshold compares False
            if run is None:
                run, length, hit = j, 0, None
            length += 1
            if hit is None and lam_f[j] >= thr_f[j]:
                hit = j
            if found is None and length >= persist:
                found = (run, "threshold")
        elif run is not None:
            if length < persist and hit is not None:
                catapults.append(int(st[hit]))
                if found is None:
                    found = (hit, "catapult")
            run = None
        i = j - h  # the smoothed point that just became final
        if found is None and early_peak and i >= 0 and peak.add(i, j):
            found = (peak.top()[0], "early-peak")
    cats = tuple(catapults)
    if found is not None:
        k, reason = found
        return BreakEven(int(st[k]), float(lam[k]), reason, "confirmed", cats, series)
    if run is not None:
        return BreakEven(int(st[run]), float(lam[run]), "threshold", "tentative", cats, series)
    if peak.p is not None:
        peak.judge(n - 1)
    if early_peak and peak.real_rise() and peak.since >= fall_persist:
        k = peak.top()[0]
        return BreakEven(int(st[k]), float(lam[k]), "early-peak", "tentative", cats, series)
    return BreakEven(None, math.nan, "none", "none", cats, series)


def mean_after(
    steps: Sequence[int] | npt.NDArray[np.int64],
    values: Sequence[float] | npt.NDArray[np.float64],
    be: BreakEven,
) -> float:
    """Mean of the finite values measured after a confirmed break-even (NaN otherwise)."""
    if not be.confirmed or be.step is None:
        return math.nan
    st = np.asarray(steps, dtype=np.int64)
    v = np.asarray(values, dtype=np.float64)
    sel = v[(st > be.step) & np.isfinite(v)]
    return float(sel.mean()) if sel.size else math.nan


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
    if lr is None or not batch_size or not math.isfinite(lr):
        return math.nan
    return lr / batch_size
