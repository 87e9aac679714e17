"""Derived quantities against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from stiffmon import derive


def test_break_even_crossing_the_threshold() -> None:
    # lr 0.1: threshold 2/η = 20; λ1 crosses at step 30
    be = derive.break_even([0, 10, 20, 30, 40], [2.0, 8.0, 15.0, 21.0, 19.5], 20.0)
    assert (be.step, be.value, be.reason) == (30, 21.0, "threshold")


def test_break_even_with_a_schedule_changing_the_threshold() -> None:
    be = derive.break_even([0, 10, 20], [5.0, 9.0, 9.5], [20.0, 20.0, 9.0])
    assert be.step == 20 and be.reason == "threshold"


def test_break_even_never_reached_uses_the_early_peak() -> None:
    # rises to 12 at step 20, drops by more than 10 % at step 30: the early-phase peak
    be = derive.break_even([0, 10, 20, 30, 40, 50], [1.0, 6.0, 12.0, 10.0, 13.0, 14.0], 20.0)
    assert (be.step, be.value, be.reason) == (20, 12.0, "peak")
    # no drop: the maximum
    be = derive.break_even([0, 10, 20], [1.0, 2.0, 3.0], None)
    assert (be.step, be.reason) == (20, "peak")
    assert derive.break_even([], [], 1.0).step is None
    assert derive.break_even([0, 1], [math.nan, math.nan], 1.0).step is None


def test_break_even_momentum_run() -> None:
    # heavy ball β = 0.9, η = 0.1: threshold (2 + 2β)/η = 38
    thr = (2 + 2 * 0.9) / 0.1
    be = derive.break_even([0, 5, 10], [10.0, 37.9, 38.5], thr)
    assert be.step == 10 and be.reason == "threshold"


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
