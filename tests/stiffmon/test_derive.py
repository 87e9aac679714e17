"""Derived quantities: the break-even detector on trajectories with known answers."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stiffmon import derive
from stiffmon.session import SessionReader
from stiffmon.store import Store

SESSIONS = Path(__file__).resolve().parents[2] / "demos" / "sessions"
SEEDS = range(12)
F = npt.NDArray[np.float64]
Steps = npt.NDArray[np.int64]


def grid(end: int = 2000, every: int = 20) -> npt.NDArray[np.int64]:
    """Measurement steps like the agent's: every step for five steps, then every 20."""
    return np.concatenate([np.arange(5), np.arange(every, end + 1, every)]).astype(np.int64)


def noisy(curve: Callable[[F], F], seed: int, rel: float, end: int = 2000) -> tuple[Steps, F]:
    steps = grid(end)
    rng = np.random.default_rng(seed)
    clean = curve(steps.astype(np.float64))
    return steps, clean * (1.0 + rel * rng.standard_normal(clean.shape))


def prefixes(steps: Steps, lam: F, thr: Any = None) -> list[derive.BreakEven]:
    """The answer after each measurement, as a live monitor sees it."""
    out = []
    for n in range(1, len(steps) + 1):
        t = thr[:n] if isinstance(thr, np.ndarray) else thr
        out.append(derive.break_even(steps[:n], lam[:n], t))
    return out


def assert_never_moves(history: list[derive.BreakEven]) -> None:
    first = next((b for b in history if b.confirmed), None)
    if first is None:
        return
    i = history.index(first)
    for b in history[i:]:
        assert (b.step, b.value, b.reason, b.status) == (
            first.step,
            first.value,
            first.reason,
            "confirmed",
        )
        assert b.catapults[: len(first.catapults)] == first.catapults


def rise_peak_fall(t: F) -> F:
    # 1 → 12 by step 600, then down to 6 at step 2000
    return np.where(t <= 600, 1.0 + 11.0 * t / 600, 12.0 - 6.0 * (t - 600) / 1400)


@pytest.mark.parametrize("seed", SEEDS)
def test_noisy_rise_peak_fall(seed: int) -> None:
    steps, lam = noisy(rise_peak_fall, seed, 0.04)
    hist = prefixes(steps, lam, 40.0)
    be = hist[-1]
    assert be.reason == "early-peak" and be.confirmed and be.catapults == ()
    assert 400 <= be.step <= 640  # type: ignore[operator]  # the end of the rise, ±3σ
    assert be.value == lam[list(steps).index(be.step)]
    # no noise dip on the way up confirms anything, and nothing is marked while still rising
    for s, b in zip(steps, hist, strict=True):
        if s <= 600:
            assert not b.confirmed
        if s <= 300:
            assert b.status == "none"
    assert_never_moves(hist)


@pytest.mark.parametrize("seed", SEEDS)
def test_initial_dip_then_rise(seed: int) -> None:
    def curve(t: F) -> F:
        dip = 5.0 - 2.0 * t / 200
        rise = 3.0 + 9.0 * (t - 200) / 600
        fall = 12.0 - 5.0 * (t - 800) / 1200
        return np.where(t <= 200, dip, np.where(t <= 800, rise, fall))

    steps, lam = noisy(curve, seed, 0.02)
    hist = prefixes(steps, lam, 100.0)
    assert all(b.step != 0 for b in hist)  # the first dip is not a peak
    be = hist[-1]
    assert be.confirmed and be.reason == "early-peak" and 680 <= be.step <= 840  # type: ignore[operator]
    assert_never_moves(hist)


@pytest.mark.parametrize("seed", SEEDS)
def test_still_rising_at_the_end(seed: int) -> None:
    steps, lam = noisy(lambda t: 1.0 + 0.01 * t, seed, 0.03, end=1500)
    hist = prefixes(steps, lam, 200.0)
    assert not any(b.confirmed for b in hist)
    clean = derive.break_even(steps, 1.0 + 0.01 * steps, 200.0)
    assert (clean.step, clean.reason, clean.status) == (None, "none", "none")


@pytest.mark.parametrize("seed", SEEDS)
def test_plateau_at_the_threshold(seed: int) -> None:
    # η = 0.1: λ1 rises to 2/η = 20 by step 400 and hovers there (edge of stability)
    steps, lam = noisy(lambda t: np.minimum(2.0 + 18.0 * t / 400, 20.0), seed, 0.015)
    hist = prefixes(steps, lam, 20.0)
    be = hist[-1]
    assert be.reason == "threshold" and be.confirmed and 340 <= be.step <= 460  # type: ignore[operator]
    # the first measurement within 5 % of the threshold that the next one does not leave
    at = (lam >= 19.0) & np.append(lam[1:] >= 19.0, False)
    assert be.step == steps[np.argmax(at)] and be.value >= 19.0
    assert_never_moves(hist)


@pytest.mark.parametrize("seed", range(5))
def test_long_noisy_plateau_is_no_fall(seed: int) -> None:
    # 5,000 measurements on a plateau with 3 % noise: its noise extremes are not a peak and a fall
    steps = np.arange(5000, dtype=np.int64) * 20
    rng = np.random.default_rng(seed)
    lam = np.minimum(1.0 + steps / 1000, 12.0) * (1.0 + 0.03 * rng.standard_normal(5000))
    be = derive.break_even(steps, lam, 200.0)
    assert be.status == "tentative" and be.reason == "early-peak"
    assert 10_000 <= be.step <= 13_000  # type: ignore[operator]


def test_catapult_spike() -> None:
    steps = grid(1000)
    lam = np.minimum(1.0 + 7.0 * steps / 200, 8.0) - 2.0 * np.clip((steps - 260) / 740, 0, 1)
    lam[steps == 260] = 16.0  # one measurement above 2/η = 10
    lam[steps == 700] = 12.0  # a second spike later
    hist = prefixes(steps, lam, 10.0)
    be = hist[-1]
    assert (be.step, be.value, be.reason, be.status) == (260, 16.0, "catapult", "confirmed")
    assert be.catapults == (260, 700)
    at = list(steps).index(260)
    assert hist[at].status == "tentative" and hist[at].reason == "threshold"  # not known yet
    assert hist[at + 1].reason == "catapult"
    assert_never_moves(hist)


def test_catapult_after_a_confirmed_peak_is_listed_not_taken() -> None:
    steps, lam = noisy(rise_peak_fall, 0, 0.0)
    before = derive.break_even(steps, lam, 40.0)
    lam = lam.copy()
    lam[steps == 1800] = 50.0
    be = derive.break_even(steps, lam, 40.0)
    assert be.reason == "early-peak" and be.step == before.step and be.catapults == (1800,)


@pytest.mark.parametrize("seed", SEEDS)
def test_staircase_from_lr_decay_is_no_peak(seed: int) -> None:
    # η drops 10× at step 1000: the threshold rises from 20 to 200 and λ1 climbs a second stair
    def curve(t: F) -> F:
        return np.minimum(1.0 + 7.0 * t / 500, 8.0) + np.clip((t - 1000) / 500, 0, 1) * 22.0

    steps, lam = noisy(curve, seed, 0.03)
    thr = np.where(steps < 1000, 20.0, 200.0)
    hist = prefixes(steps, lam, thr)
    assert not any(b.confirmed for b in hist)  # a stair is not a peak
    assert hist[-1].step is None or hist[-1].step >= 1000


@pytest.mark.parametrize("seed", SEEDS)
def test_staircase_from_warmup_crosses_the_falling_threshold(seed: int) -> None:
    # η rises 0.02 → 0.05 → 0.1 (2/η: 100 → 40 → 20); λ1 plateaus at 30, then is pushed to 2/η
    def curve(t: F) -> F:
        return np.where(t < 600, np.minimum(1.0 + 29.0 * t / 500, 30.0), 20.5)

    steps, lam = noisy(curve, seed, 0.01)
    lam[steps == 600] = 30.0
    thr = np.select([steps < 300, steps < 600], [100.0, 40.0], 20.0)
    hist = prefixes(steps, lam, thr)
    be = hist[-1]
    assert (be.step, be.reason, be.status) == (600, "threshold", "confirmed")
    assert_never_moves(hist)


def test_step_zero_only_when_at_the_threshold() -> None:
    steps = grid(600)
    falling = 10.0 * np.exp(-steps / 200)
    assert derive.break_even(steps, falling, 100.0).step is None
    be = derive.break_even(steps, falling, 9.0)
    assert (be.step, be.reason, be.status) == (0, "threshold", "confirmed")
    single = derive.break_even([0], [25.0], 20.0)
    assert (single.step, single.reason, single.status) == (0, "threshold", "tentative")


def test_edge_cases() -> None:
    assert derive.break_even([], [], 1.0) == derive.no_break_even()
    assert derive.break_even([0, 1], [math.nan, math.nan], 1.0).status == "none"
    # failed measurements are skipped, not read as a fall
    steps = grid(1000)
    lam = np.minimum(1.0 + 11.0 * steps / 400, 12.0)
    lam[steps == 420] = math.nan
    assert derive.break_even(steps, lam, None).status != "confirmed"
    be = derive.break_even(steps, lam, 20.0, series="sharpness/lambda1_precond")
    assert be.series == "sharpness/lambda1_precond"
    with pytest.raises(ValueError, match="differ"):
        derive.break_even([0, 1], [1.0], 1.0)
    with pytest.raises(ValueError, match="differ"):
        derive.break_even([0, 1], [1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="odd"):
        derive.break_even([0], [1.0], 1.0, noise_window=2)
    with pytest.raises(ValueError, match="odd"):
        derive.break_even([0], [1.0], 1.0, window=4)


@pytest.mark.parametrize("n", [1, 2, 4, 5, 6, 30])
def test_running_median_against_a_loop(n: int) -> None:
    lam = np.random.default_rng(n).standard_normal(n)
    ref = [float(np.median(lam[max(0, i - 2) : i + 3])) for i in range(n)]
    assert derive._smooth(lam, 2).tolist() == ref


@pytest.mark.parametrize("n", [1, 3, 10, 16, 17, 40])
def test_noise_against_a_loop(n: int) -> None:
    lam = np.random.default_rng(n).standard_normal(n)
    ref = [0.0] * min(n, 2)
    for j in range(2, n):
        win = lam[max(0, j - 15) : j + 1]
        d2 = win[2:] - 2 * win[1:-1] + win[:-2]
        ref.append(1.4826 * float(np.median(np.abs(d2))) / math.sqrt(6))
    assert derive._noise(lam, 16) == pytest.approx(ref, rel=1e-12)
    # white noise of σ = 1: the estimate is close to 1
    big = np.random.default_rng(0).standard_normal(20_000)
    assert derive._noise(big, 2000)[-1] == pytest.approx(1.0, rel=0.05)


def test_mean_after() -> None:
    be = derive.BreakEven(20, 3.0, "early-peak", "confirmed")
    assert derive.mean_after([0, 20, 40, 60], [1.0, 3.0, 2.0, math.nan], be) == 2.0
    tentative = derive.BreakEven(20, 3.0, "early-peak", "tentative")
    assert math.isnan(derive.mean_after([0, 20, 40], [1.0, 3.0, 2.0], tentative))


def random_walks() -> st.SearchStrategy[list[float]]:
    steps = st.floats(-0.4, 0.4, allow_nan=False)
    return st.lists(steps, min_size=1, max_size=70).map(lambda d: list(np.exp(np.cumsum(d)) * 5.0))


@settings(max_examples=150, deadline=None)
@given(
    lam=st.one_of(
        random_walks(),
        st.lists(st.one_of(st.floats(0.0, 30.0), st.just(math.nan)), min_size=1, max_size=60),
    ),
    thr=st.one_of(st.none(), st.floats(1.0, 40.0), st.just("schedule")),
)
def test_a_confirmed_marker_never_moves(lam: list[float], thr: float | str | None) -> None:
    arr = np.asarray(lam)
    steps = np.arange(arr.shape[0]) * 10
    thresholds: Any = np.where(steps < 300, 30.0, 8.0) if thr == "schedule" else thr
    assert_never_moves(prefixes(steps, arr, thresholds))


def test_a_confirmed_marker_never_moves_on_random_walks() -> None:
    # seeded walks long enough for the noise estimate to change after a marker is confirmed
    rng = np.random.default_rng(1)
    for k in range(240):
        n = int(rng.integers(20, 90))
        lam = np.exp(np.cumsum(rng.uniform(-0.4, 0.4, n))) * 5.0
        thr = (None, float(rng.uniform(1.0, 40.0)))[k % 2]
        assert_never_moves(prefixes(np.arange(n, dtype=np.int64) * 10, lam, thr))


def test_recorded_digits_sweep() -> None:
    store = Store()
    for f in sorted(SESSIONS.glob("lr*.stiff")):
        store.extend(SessionReader(f).messages(), replay=True)
    runs = {rd.lr: rd for rd in store.runs.values()}
    assert sorted(runs) == [0.01, 0.05, 0.2]
    be = {lr: rd.break_even() for lr, rd in runs.items()}
    # η = 0.2 catapults above 2/η = 10 at step 80 (λ1_H 16.1, 6.1 at the next measurement)
    assert (be[0.2].step, be[0.2].reason, be[0.2].status) == (80, "catapult", "confirmed")
    assert be[0.2].catapults == (80,) and be[0.2].value == pytest.approx(16.13, abs=0.01)
    # η = 0.05 rises to ≈ 12 by step 180–220, then falls to ≈ 7
    assert be[0.05].reason == "early-peak" and be[0.05].confirmed
    assert 160 <= be[0.05].step <= 300  # type: ignore[operator]
    # η = 0.01 is still on its plateau at step 1500: no fall yet, so not confirmed
    assert be[0.01].status == "tentative" and be[0.01].reason == "early-peak"
    k = {lr: rd.break_even_k() for lr, rd in runs.items()}
    assert all(b.confirmed and b.series == "noise/lambda1_k" for b in k.values())
    assert k[0.2].step < k[0.05].step < k[0.01].step  # type: ignore[operator]
    for rd in runs.values():
        lam = rd.series("sharpness/lambda1_h")
        thr = rd.series("sharpness/threshold")
        assert lam is not None and thr is not None
        assert_never_moves(prefixes(lam.steps, lam.values, thr.values))


def test_ema_matches_tensorboard() -> None:
    # TensorBoard: last = last*w + (1-w)*v; debiased by 1 - w^k
    vals = [1.0, 2.0, math.nan, 3.0]
    out = derive.ema(vals, 0.5)
    assert out[0] == pytest.approx(1.0)
    assert out[1] == pytest.approx((0.25 + 1.0) / 0.75)
    assert math.isnan(out[2])
    last = 0.5 * (0.5 * 0.5 + 1.0) + 1.5
    assert out[3] == pytest.approx(last / (1 - 0.125))
    assert derive.ema([4.0, 5.0], 0.0) == [4.0, 5.0]
    with pytest.raises(ValueError):
        derive.ema([1.0], 1.0)


def test_peak_and_ratio() -> None:
    assert derive.peak([1.0, math.nan, 3.0]) == 3.0
    assert math.isnan(derive.peak([]))
    assert derive.lr_over_batch(0.1, 128) == pytest.approx(0.1 / 128)
    assert math.isnan(derive.lr_over_batch(0.1, None))
    assert math.isnan(derive.lr_over_batch(math.nan, 64))
