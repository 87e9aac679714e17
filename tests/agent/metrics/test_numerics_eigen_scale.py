"""Sharpness at extreme loss scales, at saddles and with (near-)degenerate tops, against a dense
float64 Hessian (``torch.autograd.functional.hessian`` + ``eigvalsh``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from stiffmon_agent.metrics.sharpness import hessian_eigen


def _quadratic(a: Tensor, scale: float, dtype: torch.dtype, n: int = 8) -> tuple:
    """A linear model with the per-example loss scale · ½ outᵀ A out (any symmetric A)."""
    torch.manual_seed(0)
    model = nn.Linear(5, a.shape[0], bias=False).to(dtype)
    x = torch.randn(n, 5, dtype=dtype)
    ad = a.to(dtype)

    def loss(out: Tensor, y: Tensor | None = None) -> Tensor:
        return scale * 0.5 * ((out @ ad) * out).sum(1)

    return model, x, loss


def _dense_eigvals(model: nn.Module, x: Tensor, loss) -> Tensor:  # type: ignore[no-untyped-def]
    """Eigenvalues of the dense float64 Hessian of the mean loss (ascending)."""
    w = model.weight.detach().double()
    xd = x.double()

    def f(flat: Tensor) -> Tensor:
        return loss(xd @ flat.view_as(w).T).mean()

    return torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, w.reshape(-1)))


def _solve(model, x, loss, **kw):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(1)
    y = torch.zeros(x.shape[0])
    return hessian_eigen(model, x, y, lambda o, t: loss(o), generator=gen, max_hvps=100, **kw)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e-8, 1e8])
def test_float32_tiny_and_huge_scales(scale: float) -> None:
    """Residual norms accumulate in float64: in float32 at scale 1e-30 the residual's squares
    underflowed to 0 and a Lanczos solve 51 % low (3.93e-30 against 8.07e-30) read converged."""
    a = torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64))
    model, x, loss = _quadratic(a, scale, torch.float32)
    ref = float(_dense_eigvals(model, x, _quadratic(a, scale, torch.float64)[2])[-1])
    res = _solve(model, x, loss, tol=1e-3)
    ours = float(res.eigenvalues[0])
    assert res.converged
    assert abs(ours - ref) / abs(ref) < 1e-3, (ours, ref)


def test_power_iteration_tiny_scale() -> None:
    """PyHessian's stopping rule is relative: an absolute floor of 1e-12 on |λ_prev| stopped a
    float64 power iteration at λ ~ 6e-20 after 2 products, 63 % low."""
    a = torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64))
    model, x, loss = _quadratic(a, 1e-20, torch.float64)
    ref = float(_dense_eigvals(model, x, loss)[-1])
    res = _solve(model, x, loss, tol=1e-6, method="power")
    assert abs(float(res.eigenvalues[0]) - ref) / abs(ref) < 1e-2


@pytest.mark.parametrize(
    "diag",
    [
        (1.0, -10.0, 0.5),  # a saddle whose largest-magnitude eigenvalue is negative
        (-1.0, -10.0, -2.0),  # negative definite: λ1_H < 0
        (3.0, 3.0, 3.0, 1.0),  # exactly degenerate top
        (3.0, 3.0 - 3e-6, 1.0),  # spectral gap 1e-6
    ],
)
def test_lanczos_is_largest_algebraic(diag: tuple[float, ...]) -> None:
    """λ1_H is the largest algebraic eigenvalue (DESIGN §3), to 1e-9 of eigvalsh, also where
    the most negative one dominates (PyHessian's power iteration reports that one)."""
    a = torch.diag(torch.tensor(diag, dtype=torch.float64))
    model, x, loss = _quadratic(a, 1.0, torch.float64)
    ev = _dense_eigvals(model, x, loss)
    res = _solve(model, x, loss, tol=1e-10)
    assert res.converged
    assert abs(float(res.eigenvalues[0]) - float(ev[-1])) <= 1e-9 * float(ev.abs().max())
    if diag[0] == 1.0:  # the saddle: power iteration converges to the negative one
        power = _solve(model, x, loss, tol=1e-10, method="power", k=1)
        assert float(power.eigenvalues[0]) < 0
        assert math.isclose(float(power.eigenvalues[0]), float(ev[0]), rel_tol=1e-3)


def test_lowest_ritz_bounds_the_negative_eigenvalue() -> None:
    """At a saddle whose most negative eigenvalue dominates, the solve also says so: its
    smallest Ritz value is ≥ λ_min (a bound, free) and, the space being exhausted here, equal."""
    a = torch.diag(torch.tensor([1.0, -10.0, 0.5], dtype=torch.float64))
    model, x, loss = _quadratic(a, 1.0, torch.float64)
    ev = _dense_eigvals(model, x, loss)
    res = _solve(model, x, loss, tol=1e-10)
    assert res.lowest >= float(ev[0]) - 1e-9 * float(ev.abs().max())
    assert res.lowest < -abs(float(res.eigenvalues[0]))
    assert res.lowest == pytest.approx(float(ev[0]), rel=1e-9)
