"""A warm start that misses a new top direction, and the cold check that finds it (float64,
explicit matrices against ``torch.linalg.eigvalsh``)."""

from __future__ import annotations

import math

import pytest
import torch

from stiffmon_agent.metrics.eigen import lanczos
from stiffmon_agent.metrics.eigen_checked import checked_lanczos
from stiffmon_agent.sharpness_state import CHECK_DROP, CHECK_EVERY, SharpnessState

DIM = 80


def _operator(values: torch.Tensor, q: torch.Tensor):  # type: ignore[no-untyped-def]
    a = (q * values) @ q.T
    return a, (lambda v: a @ v)


def _basis() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
    return q


def _spectra() -> tuple[torch.Tensor, torch.Tensor]:
    """Before: q0 on top (10), q1 next (9). After: q0 dropped to 3, q1 to 6, and q2 (not in the
    warm block at all) rose to 8: the new λ1."""
    rest = torch.linspace(2.0, -1.0, DIM - 3, dtype=torch.float64)
    before = torch.cat([torch.tensor([10.0, 9.0, 1.0], dtype=torch.float64), rest])
    after = torch.cat([torch.tensor([3.0, 6.0, 8.0], dtype=torch.float64), rest])
    return before, after


def test_a_warm_start_misses_a_direction_it_lacks_and_the_cold_check_finds_it() -> None:
    q = _basis()
    before, after = _spectra()
    _, mv0 = _operator(before, q)
    a1, mv1 = _operator(after, q)
    g = torch.Generator().manual_seed(0)
    first = lanczos(mv0, DIM, 1, generator=g)
    assert float(first.eigenvalues[0]) == pytest.approx(10.0, rel=1e-2)
    warm = lanczos(mv1, DIM, 1, init=first.warm_start, generator=g)
    lam1 = float(torch.linalg.eigvalsh(a1)[-1])
    assert lam1 == pytest.approx(8.0, rel=1e-12)
    assert warm.converged and float(warm.eigenvalues[0]) < 0.8 * lam1  # converged on 6: missed
    last = float(first.eigenvalues[0])
    checked = checked_lanczos(
        mv1, DIM, 1, init=first.warm_start, check_below=last - CHECK_DROP * last, generator=g
    )
    assert checked.cold_checked
    assert float(checked.eigenvalues[0]) == pytest.approx(lam1, rel=1e-2)
    assert float(checked.eigenvalues[0]) <= lam1 + 1e-9  # a lower bound, as any Ritz value
    assert checked.matvecs > warm.matvecs  # both runs counted


def test_a_warm_result_above_the_check_is_left_alone_and_a_cold_start_is_never_checked() -> None:
    q = _basis()
    before, _ = _spectra()
    _, mv0 = _operator(before, q)
    g = torch.Generator().manual_seed(0)
    first = lanczos(mv0, DIM, 1, generator=g)
    again = checked_lanczos(mv0, DIM, 1, init=first.warm_start, check_below=9.0, generator=g)
    assert not again.cold_checked
    cold = checked_lanczos(mv0, DIM, 1, check_below=math.inf, generator=g)
    assert not cold.cold_checked
    always = checked_lanczos(mv0, DIM, 1, init=first.warm_start, check_below=math.inf, generator=g)
    assert always.cold_checked and float(always.eigenvalues[0]) == pytest.approx(10.0, rel=1e-2)


def test_the_state_checks_big_drops_and_every_nth_warm_measurement() -> None:
    state = SharpnessState()
    assert state.check_below("raw") is None  # no λ1 yet: a cold start anyway

    class R:  # the fields note() reads
        def __init__(self, lam: float, cold: bool) -> None:
            self.eigenvalues = torch.tensor([lam])
            self.cold_checked = cold

    state.note("raw", R(100.0, False))  # type: ignore[arg-type]
    assert state.check_below("raw") == pytest.approx(100.0 * (1 - CHECK_DROP))
    for _ in range(CHECK_EVERY - 2):
        state.note("raw", R(100.0, False))  # type: ignore[arg-type]
    assert state.check_below("raw") == math.inf  # the CHECK_EVERY-th warm one
    state.note("raw", R(120.0, True))  # type: ignore[arg-type]
    assert state.check_below("raw") == pytest.approx(120.0 * (1 - CHECK_DROP))
    assert state.check_below("precond") is None  # each operator its own
