"""Gradient-noise quantities against an explicit P×P covariance."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stiffmon_agent.metrics import gradient_noise, per_example_gram
from tests.agent.metrics.models import make_cases
from tests.agent.metrics.reference import loop_gradients

CE = nn.CrossEntropyLoss()


@pytest.mark.parametrize("name", ["mlp", "cnn", "layernorm"])
def test_noise_against_explicit_covariance(name: str) -> None:
    model, x, y = make_cases()[name]
    g = loop_gradients(model, x, y, CE)  # (N, P)
    n = g.shape[0]
    mean = g.mean(0)
    k_cov = sum(torch.outer(gi - mean, gi - mean) for gi in g) / n  # explicit P×P
    evals = torch.linalg.eigvalsh(k_cov).flip(0)
    got = gradient_noise(per_example_gram(model, x, y, CE).total, k=4)
    assert got.trace_k == pytest.approx(float(torch.trace(k_cov)), rel=1e-10)
    torch.testing.assert_close(got.eigenvalues, evals[:4], rtol=1e-9, atol=1e-12)
    assert got.lambda1 == pytest.approx(float(evals[0]), rel=1e-10)
    torch.testing.assert_close(got.conditioning, evals[:4] / evals[0], rtol=1e-9, atol=1e-12)
    trace_sigma = sum(float((gi - mean) @ (gi - mean)) for gi in g) / (n - 1)
    g2 = float(mean @ mean) - trace_sigma / n
    assert got.trace_sigma == pytest.approx(trace_sigma, rel=1e-10)
    assert got.mean_grad_sq == pytest.approx(float(mean @ mean), rel=1e-10)
    if g2 > 0:
        assert got.b_simple == pytest.approx(trace_sigma / g2, rel=1e-9)
    else:
        assert math.isnan(got.b_simple)


def test_noise_edge_cases() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        gradient_noise(torch.ones(1, 1, dtype=torch.float64))
    # identical gradients: no noise, B_simple = 0
    g = torch.full((4, 4), 2.0, dtype=torch.float64)
    got = gradient_noise(g)
    assert got.trace_k == pytest.approx(0.0, abs=1e-12)
    assert got.b_simple == pytest.approx(0.0, abs=1e-12)
    # opposite gradients: mean zero, B_simple undefined (NaN), documented
    g = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    got = gradient_noise(g)
    assert math.isnan(got.b_simple) and got.trace_k == pytest.approx(1.0)
