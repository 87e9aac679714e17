"""Cockpit's batch-size tests where the mean gradient cancels, and at B = 2, against float64
loops over per-example gradients."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from stiffmon_agent.metrics import per_example_gram
from stiffmon_agent.metrics.gradient_tests import gradient_tests
from tests.agent.metrics.reference import loop_gradients


def _mse(out: Tensor, y: Tensor) -> Tensor:
    return ((out - y) ** 2).mean(1)


def _cancelling(seed: int) -> tuple[nn.Module, Tensor, Tensor]:
    """Four copies of one input with targets p ± d, p ± 2d around the prediction p: the
    residuals, and so the gradients, sum to exactly 0 (ḡ = 0)."""
    torch.manual_seed(seed)
    model = nn.Linear(5, 1)
    x = torch.randn(1, 5).repeat(4, 1) * 3.7
    with torch.no_grad():
        p = model(x[:1])
    d = torch.rand(1, 1)
    return model, x, torch.cat([p + d, p - d, p + 2 * d, p - 2 * d])


@pytest.mark.parametrize("seed", range(40))
def test_cancelling_mean_gradient_is_undefined(seed: int) -> None:
    """ḡ = 0 up to the float32 rounding of the targets (‖ḡ‖² ≤ 1e-9 mean ‖g_i‖² in float64:
    θ_max ≥ 10⁴, or undefined, beyond what a float32 Gram resolves), so every test is NaN; the
    float32 Gram's ‖ḡ‖² came out +1e-7 in about a quarter of the draws and θ_max up to 14,568."""
    model, x, y = _cancelling(seed)
    g64 = loop_gradients(copy.deepcopy(model).double(), x.double(), y.double(), _mse)
    mean64 = g64.mean(0)
    assert float(mean64 @ mean64) <= 1e-9 * float((g64 * g64).sum(1).mean())
    got = gradient_tests(per_example_gram(model, x, y, _mse).total)
    assert math.isnan(got.norm_test), got
    assert math.isnan(got.inner_product_test) and math.isnan(got.orthogonality_test)
    assert all(math.isnan(v) for v in got.suggested_batch().values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_two_examples_against_loops(dtype: torch.dtype) -> None:
    """B = 2 (the smallest with a sample variance): θ_max by a float64 loop over g_i."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    x = torch.randn(2, 4, dtype=dtype)
    y = torch.tensor([0, 2])
    ce = nn.CrossEntropyLoss()
    g = loop_gradients(model, x, y, ce).double()
    mean = g.mean(0)
    g2 = float(mean @ mean)
    var = sum(float((gi - mean) @ (gi - mean)) for gi in g) / 1
    ref = math.sqrt(var / (2 * g2))
    got = gradient_tests(per_example_gram(model, x, y, ce).total)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got.norm_test == pytest.approx(ref, rel=tol)
