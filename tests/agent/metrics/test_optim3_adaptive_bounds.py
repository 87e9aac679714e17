"""Bounds on λ1(P⁻¹H) for Adagrad (``initial_accumulator_value``, ``lr_decay``), Adadelta,
SparseAdam, and coupled L2 (Adam, RMSprop, Adadelta), each against the step where torch's own
optimizer diverges on f(x) = ½ λ x² in float64 (x tiny, so the state's g² ≪ ε and P is fixed):
λ1(P⁻¹(H + wd)) = (λ + wd)/P there, and the bound is right iff the optimizer converges at
λ = 0.99 × (bound·P − wd) and diverges at 1.01 × it.

Adagrad's P = √s + ε grows once x does, which ends any divergence: its runs are 400 steps
(|x| stays < 1e-16, s ≪ ε²), long enough for 1.02^400 ≫ 1 ≫ 0.98^400.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from stiffmon_agent.metrics.preconditioner import coupled_decay, diagonal_preconditioner
from stiffmon_agent.metrics.thresholds import preconditioned_threshold_for
from tests.agent.metrics.reference import TINY, quadratic_growth

Make = Callable[[nn.Parameter], torch.optim.Optimizer]


def _param() -> nn.Parameter:
    return nn.Parameter(torch.tensor([TINY], dtype=torch.float64))


def _one_step(opt: torch.optim.Optimizer, x: nn.Parameter, sparse: bool = False) -> None:
    g = torch.zeros_like(x)
    x.grad = g.to_sparse() if sparse else g
    opt.step()


def _growth(opt: torch.optim.Optimizer, x: nn.Parameter, lam: float, steps: int, sparse: bool):
    if not sparse:
        return quadratic_growth(opt, x, lam, steps)
    with torch.no_grad():
        x.fill_(TINY)
    for _ in range(steps):
        x.grad = (lam * x.detach()).to_sparse()
        opt.step()
    return float(x.detach().abs().max()) / TINY


def _check_edge(make: Make, steps: int = 3000, sparse: bool = False, late: int = 0) -> float:
    """The bound of ``make``'s optimizer (after one step, and at step ``late`` if given) turned
    into the λ where it should diverge; asserts torch's optimizer converges at 0.99× and
    diverges at 1.01× that λ. Returns the λ."""
    edges = []
    for factor, stable in ((0.99, True), (1.01, False)):
        x = _param()
        opt = make(x)
        _one_step(opt, x, sparse)
        if late:
            opt.state[x]["step"] = (
                torch.tensor(float(late)) if torch.is_tensor(opt.state[x]["step"]) else late
            )
        bound = preconditioned_threshold_for(opt)
        assert bound.value is not None, bound.rule
        p, why = diagonal_preconditioner(opt, [x])
        assert p is not None, why
        wd = coupled_decay(opt, [x])
        edge = bound.value * float(p[0]) - (float(wd[0]) if wd is not None else 0.0)
        edges.append(edge)
        final = _growth(opt, x, factor * edge, steps, sparse)
        assert (final < 1e-2) == stable, (factor, edge, final, bound.rule)
    return edges[0]


def test_adagrad_initial_accumulator_is_in_p() -> None:
    """s starts at 0.25: P = 0.5, so Adagrad at lr 0.1 diverges at λ = 2/0.1 × 0.5 = 10."""
    edge = _check_edge(
        lambda x: torch.optim.Adagrad([x], lr=0.1, eps=1e-10, initial_accumulator_value=0.25),
        steps=400,
    )
    assert edge == pytest.approx(10.0, rel=1e-6)


def test_adagrad_lr_decay_bound_uses_the_decayed_step_size() -> None:
    """At step t = 10⁶ with lr_decay 1e-2 η_t = 0.1/(1 + (10⁶−1)·1e-2) ≈ 1e-5: the bound is
    2/η_t ≈ 2e5, not 2/lr = 20."""
    make: Make = lambda x: torch.optim.Adagrad([x], lr=0.1, eps=1.0, lr_decay=1e-2)  # noqa: E731
    edge = _check_edge(make, steps=400, late=10**6)
    assert edge == pytest.approx(2 * (1 + (10**6 - 1) * 1e-2) / 0.1, rel=1e-6)
    x = _param()
    opt = make(x)
    _one_step(opt, x)
    opt.state[x]["step"] = torch.tensor(1e6)
    assert "η_t = lr/(1+(t-1)·lr_decay) = 9.999e-06" in preconditioned_threshold_for(opt).rule


def test_adagrad_coupled_l2() -> None:
    edge = _check_edge(lambda x: torch.optim.Adagrad([x], lr=0.1, eps=1.0, weight_decay=3.0), 400)
    assert edge == pytest.approx(20.0 - 3.0, rel=1e-6)


def test_adadelta_bound_and_coupled_l2() -> None:
    """Adadelta steps lr·√(u+ε)/√(v+ε)·g: P = √(v+ε)/√(u+ε) = 1 at x tiny; wd = 1 is coupled:
    it diverges at 2/0.5 − 1 = 3, where 2/lr alone says 4."""
    make: Make = lambda x: torch.optim.Adadelta([x], lr=0.5, weight_decay=1.0)  # noqa: E731
    assert _check_edge(make) == pytest.approx(3.0, rel=1e-6)
    x = _param()
    assert "P⁻¹(H+wd)" in preconditioned_threshold_for(make(x)).rule


@pytest.mark.parametrize(
    ("make", "edge"),
    [
        (lambda x: torch.optim.Adam([x], lr=0.01, eps=1.0, weight_decay=100.0), 3700.0),
        (lambda x: torch.optim.RMSprop([x], lr=0.01, eps=1.0, weight_decay=20.0), 180.0),
        (lambda x: torch.optim.Adamax([x], lr=0.01, eps=1.0, weight_decay=100.0), None),
    ],
    ids=["Adam", "RMSprop", "Adamax"],
)
def test_coupled_l2_enters_the_preconditioned_curvature(make: Make, edge: float | None) -> None:
    """Adam at wd = 100 diverges at λ = 3800 − 100 = 3700 (without wd in P⁻¹(H + wd) the bound
    would allow 3800: 2.7 % too high)."""
    got = _check_edge(make, late=10**4)  # past the bias corrections: P = 1
    if edge is not None:
        assert got == pytest.approx(edge, rel=1e-3)


def test_sparse_adam() -> None:
    """SparseAdam's P = (1 − β1^t)(√v + ε)/√(1 − β2^t) (ε before the bias correction): at
    t = 10⁵ and x tiny P = 1, bound 38/η = 3800."""
    edge = _check_edge(
        lambda x: torch.optim.SparseAdam([x], lr=0.01, eps=1.0), sparse=True, late=10**5
    )
    assert edge == pytest.approx(3800.0, rel=1e-6)
