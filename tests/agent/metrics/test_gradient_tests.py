"""Cockpit's norm, inner-product and orthogonality tests against a naive per-example loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from stiffmon_agent.metrics import gradient_tests, per_example_gram
from tests.agent.metrics.models import make_cases
from tests.agent.metrics.reference import loop_gradients

CE = nn.CrossEntropyLoss()


def naive_tests(g: Tensor) -> dict[str, float]:
    """The papers' definitions, one example at a time, from explicit gradient vectors (B, P)."""
    b = g.shape[0]
    mean = g.mean(0)
    g2 = float(mean @ mean)
    var_norm = sum(float((gi - mean) @ (gi - mean)) for gi in g) / (b - 1)
    var_inner = sum((float(gi @ mean) - g2) ** 2 for gi in g) / (b - 1)
    var_ortho = 0.0
    for gi in g:
        r = gi - (float(gi @ mean) / g2) * mean
        var_ortho += float(r @ r)
    var_ortho /= b - 1
    return {
        "norm": math.sqrt(var_norm / (b * g2)),
        "inner": math.sqrt(var_inner / (b * g2**2)),
        "ortho": math.sqrt(var_ortho / (b * g2)),
        "var_norm": var_norm,
        "var_inner": var_inner,
        "var_ortho": var_ortho,
        "g2": g2,
    }


@pytest.mark.parametrize("name", ["mlp", "cnn", "layernorm"])
def test_against_per_example_loop(name: str) -> None:
    model, x, y = make_cases()[name]
    g = loop_gradients(model, x, y, CE)
    want = naive_tests(g)
    got = gradient_tests(per_example_gram(model, x, y, CE).total)
    assert got.n == g.shape[0]
    assert got.norm_test == pytest.approx(want["norm"], rel=1e-9)
    assert got.inner_product_test == pytest.approx(want["inner"], rel=1e-9)
    assert got.orthogonality_test == pytest.approx(want["ortho"], rel=1e-9)
    assert got.var_norm == pytest.approx(want["var_norm"], rel=1e-9)
    assert got.var_inner == pytest.approx(want["var_inner"], rel=1e-9)
    assert got.var_ortho == pytest.approx(want["var_ortho"], rel=1e-9)
    assert got.grad_sq == pytest.approx(want["g2"], rel=1e-9)
    # Cockpit's convention: per-example gradients of the mean loss, ∇ℓ_i / B. Same values.
    b = g.shape[0]
    scaled = gradient_tests((g / b) @ (g / b).T)
    assert scaled.norm_test == pytest.approx(want["norm"], rel=1e-9)
    assert scaled.inner_product_test == pytest.approx(want["inner"], rel=1e-9)
    assert scaled.orthogonality_test == pytest.approx(want["ortho"], rel=1e-9)


def test_suggested_batch_sizes() -> None:
    model, x, y = make_cases()["mlp"]
    g = loop_gradients(model, x, y, CE)
    b = g.shape[0]
    t = gradient_tests(g @ g.T)
    # at θ = θ_max each test suggests exactly the batch it was measured on (Cockpit's check)
    at_max = t.suggested_batch(t.norm_test, t.inner_product_test, t.orthogonality_test)
    for v in at_max.values():
        assert v == pytest.approx(b, rel=1e-9)
    want = naive_tests(g)
    got = t.suggested_batch(0.5, 0.9, 5.84)
    assert got["norm_test"] == pytest.approx(want["var_norm"] / (0.25 * want["g2"]), rel=1e-9)
    assert got["inner_product_test"] == pytest.approx(
        want["var_inner"] / (0.81 * want["g2"] ** 2), rel=1e-9
    )
    assert got["orthogonality_test"] == pytest.approx(
        want["var_ortho"] / (5.84**2 * want["g2"]), rel=1e-9
    )
    with pytest.raises(ValueError, match="positive"):
        t.suggested_batch(0.0)


def test_edge_cases() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        gradient_tests(torch.ones(1, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        gradient_tests(torch.ones(2, 3))
    # identical gradients: no variance, every test passes with θ = 0, suggested batch 0
    same = gradient_tests(torch.full((4, 4), 2.0, dtype=torch.float64))
    assert same.norm_test == pytest.approx(0.0, abs=1e-12)
    assert same.inner_product_test == pytest.approx(0.0, abs=1e-12)
    assert same.orthogonality_test == pytest.approx(0.0, abs=1e-7)
    assert same.suggested_batch()["norm_test"] == pytest.approx(0.0, abs=1e-12)
    # opposite gradients: ‖ḡ‖² = 0, the tests are undefined
    opp = gradient_tests(torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64))
    assert math.isnan(opp.norm_test) and math.isnan(opp.orthogonality_test)
    assert all(math.isnan(v) for v in opp.suggested_batch().values())
    # two orthogonal unit gradients: ḡ = (e1 + e2)/2, ‖ḡ‖² = 1/2; by hand
    two = gradient_tests(torch.eye(2, dtype=torch.float64))
    assert two.norm_test == pytest.approx(math.sqrt((2 - 2 * 0.5) / 1 / (2 * 0.5)))
    assert two.inner_product_test == pytest.approx(0.0, abs=1e-12)  # both project to 1/2
    # residual of e1 orthogonal to ḡ: e1 − ḡ, squared norm 1/2; two of them over B−1 = 1
    assert two.orthogonality_test == pytest.approx(math.sqrt(1.0 / (2 * 0.5)))
