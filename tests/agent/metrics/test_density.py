"""Hutchinson trace and stochastic Lanczos quadrature against the dense float64 Hessian."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from stiffmon_agent.metrics import HessianOperator, measurement_mode
from stiffmon_agent.metrics.density import (
    lanczos_quadrature,
    rademacher,
    spectral_density,
    trace_from_samples,
)
from stiffmon_agent.metrics.eigen import lanczos
from tests.agent.metrics.reference import dense_hessian_of

CE = nn.CrossEntropyLoss()


def small_problem() -> tuple[nn.Module, Tensor, Tensor]:
    """A float64 MLP (P = 51) on 12 examples, 3 classes."""
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    return model, x, y


def dense_hessian(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The P×P Hessian of the mean loss, by torch.autograd.functional.hessian."""
    h = dense_hessian_of(model, x, lambda out: CE(out, y))
    return 0.5 * (h + h.T)


def test_trace_within_three_standard_errors() -> None:
    model, x, y = small_problem()
    h = dense_hessian(model, x, y)
    with measurement_mode(model):
        op = HessianOperator(model, x, y, CE)
        res = spectral_density(
            op,
            op.dim,
            runs=4,
            steps=10,
            trace_samples=60,
            generator=torch.Generator().manual_seed(0),
        )
    assert res.trace.samples == 64 and res.matvecs == 4 * 10 + 60 == op.calls
    assert res.trace.stderr > 0
    assert abs(res.trace.mean - float(h.trace())) < 3 * res.trace.stderr


def test_quadrature_is_exact_per_run() -> None:
    """Σ w θ^k = qᵀA^k q for k ≤ 2m − 1 with q the run's own start vector."""
    a = torch.randn(30, 30, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    a = a + a.T
    res = spectral_density(
        lambda v: a @ v, 30, runs=1, steps=4, generator=torch.Generator().manual_seed(7)
    )
    q = rademacher(30, a, torch.Generator().manual_seed(7)) / math.sqrt(30)
    for k in range(1, 8):  # degree ≤ 2·4 − 1
        want = float(q @ torch.linalg.matrix_power(a, k) @ q)
        assert float(res.moment(k)[0]) == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert float(res.weights.sum()) == pytest.approx(1.0)
    assert res.trace.samples == 1 and math.isnan(res.trace.stderr)
    assert res.trace.mean == pytest.approx(float(q @ a @ q) * 30, rel=1e-9)


def test_density_moments_and_support_against_dense_eigenvalues() -> None:
    model, x, y = small_problem()
    h = dense_hessian(model, x, y)
    lam = torch.linalg.eigvalsh(h)
    gen = torch.Generator().manual_seed(1)
    with measurement_mode(model):
        op = HessianOperator(model, x, y, CE)
        # 2 steps already integrate degree ≤ 3 exactly: many cheap runs for the moments
        many = spectral_density(op, op.dim, runs=60, steps=2, generator=gen)
        # one long run for the support (extreme Ritz values converge first)
        long = spectral_density(op, op.dim, runs=1, steps=40, generator=gen)
    assert many.matvecs == 120 and long.matvecs == 40
    m1, m2 = many.moment(1), many.moment(2)
    se1 = float(m1.std() / math.sqrt(many.runs))
    se2 = float(m2.std() / math.sqrt(many.runs))
    # E[Σ w θ] = tr(H)/P, E[Σ w θ²] = tr(H²)/P
    assert abs(float(m1.mean()) - float(lam.mean())) < 3 * se1
    assert abs(float(m2.mean()) - float((lam**2).mean())) < 3 * se2
    assert float(long.nodes.max()) == pytest.approx(float(lam.max()), rel=1e-6)
    assert float(long.nodes.min()) == pytest.approx(float(lam.min()), rel=1e-3, abs=1e-8)
    grid, dens, sigma = long.broadened(points=2000)
    assert float(grid[0]) <= float(lam.min()) and float(grid[-1]) >= float(lam.max())
    assert sigma == pytest.approx(0.01 * float(long.nodes.max() - long.nodes.min()))
    assert bool((dens >= 0).all())
    # the broadened density keeps the quadrature's moments (variance + σ²)
    grid, dens, sigma = many.broadened(points=4000)
    dx = float(grid[1] - grid[0])
    mass = float(torch.trapezoid(dens, dx=dx))
    mean = float(torch.trapezoid(grid * dens, dx=dx))
    second = float(torch.trapezoid(grid**2 * dens, dx=dx))
    assert mass == pytest.approx(1.0, abs=1e-3)
    assert mean == pytest.approx(float(m1.mean()), rel=1e-3)
    assert second == pytest.approx(float(m2.mean()) + sigma**2, rel=1e-3)
    assert second - sigma**2 == pytest.approx(float((lam**2).mean()), rel=0.25)


def test_errors_and_small_dimensions() -> None:
    eye = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError):
        spectral_density(lambda v: v, 3, runs=0)
    with pytest.raises(ValueError):
        trace_from_samples([])
    # steps beyond P are capped; the identity is one eigenvalue 1 with weight 1
    res = spectral_density(
        lambda v: eye @ v, 3, runs=2, steps=10, generator=torch.Generator().manual_seed(0)
    )
    assert res.steps == 3
    assert float(res.moment(1).mean()) == pytest.approx(1.0)
    assert res.trace.mean == pytest.approx(3.0) and res.trace.stderr == pytest.approx(0.0)
    grid, dens, sigma = res.broadened(points=64)
    assert sigma == 1e-12  # all Ritz values agree: the floor
    assert abs(float(grid[int(dens.argmax())]) - 1.0) < 1e-11
    with pytest.raises(ValueError):
        res.broadened(points=1)


def test_quadrature_matches_the_sharpness_lanczos() -> None:
    """Same start, same Ritz values as eigen.lanczos (an independent implementation)."""
    a = torch.randn(40, 40, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    a = a + a.T
    q = rademacher(40, a, torch.Generator().manual_seed(3)) / math.sqrt(40)
    nodes, weights = lanczos_quadrature(lambda v: a @ v, q, 12)
    ref = lanczos(lambda v: a @ v, 40, 12, init=q, tol=0.0, max_matvecs=12)
    torch.testing.assert_close(nodes, ref.eigenvalues.sort().values, rtol=1e-8, atol=1e-10)
    want = (q @ ref.eigenvectors) ** 2  # (qᵀ y_k)², y_k the Ritz vectors
    torch.testing.assert_close(weights, want[torch.argsort(ref.eigenvalues)], rtol=1e-6, atol=1e-10)
    # a start in a 3-dimensional invariant subspace: exact after 3 steps, padded with weight 0
    d = torch.diag(torch.arange(1.0, 41.0, dtype=torch.float64))
    e = torch.zeros(40, dtype=torch.float64)
    e[[0, 5, 9]] = 1 / math.sqrt(3)
    nodes, weights = lanczos_quadrature(lambda v: d @ v, e, 8)
    assert nodes.shape == weights.shape == (8,)
    support = weights > 1e-12
    torch.testing.assert_close(nodes[support], torch.tensor([1.0, 6.0, 10.0], dtype=torch.float64))
    torch.testing.assert_close(weights[support], torch.full((3,), 1 / 3, dtype=torch.float64))
