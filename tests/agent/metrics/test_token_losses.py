"""Token-level class targets with padding: each example's loss is its own mean over the positions
the loss counts (not over the padding), in the per-example losses, the Gram matrix and the
sharpness; checked against each example's loss computed alone, in float64."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon_agent.metrics import hessian_eigen
from stiffmon_agent.metrics.gram import per_example_gram
from stiffmon_agent.metrics.probe import per_example_losses, unreduced
from tests.agent.metrics.models import TokenLM
from tests.agent.metrics.reference import dense_hessian_of, loop_gram, rel_err

V, T, B = 7, 6, 5


def _data() -> tuple[TokenLM, Tensor, Tensor, Tensor]:
    torch.manual_seed(0)
    model = TokenLM(V).double()
    x = torch.randint(0, V, (B, T))
    y = torch.randint(0, V, (B, T))
    for i, length in enumerate((6, 4, 2, 5, 1)):  # padded to T: lengths differ
        y[i, length:] = -100
    weight = torch.rand(V, dtype=torch.float64) + 0.5
    return model, x, y, weight


def _alone(weight: Tensor | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """The mean-reduced loss of one example on its own, (1, T, V) logits: the reference."""
    return lambda out, y: F.cross_entropy(out.transpose(1, 2), y, weight=weight)


class FlatCE(nn.CrossEntropyLoss):
    """The usual training-loop wrapper: flattens tokens into the batch dimension."""

    def forward(self, out: Tensor, y: Tensor) -> Tensor:
        return super().forward(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _transposed(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).transpose(1, 2)  # (B, V, T), as nn.CrossEntropyLoss takes it


LOSSES: dict[str, tuple[Any, Any]] = {  # loss_fn, forward
    "module": (nn.CrossEntropyLoss(), _transposed),
    "module-ignore-7": (nn.CrossEntropyLoss(ignore_index=-7), _transposed),
    "flattening-wrapper": (FlatCE(), None),
    "callable": (lambda out, y: F.cross_entropy(out.transpose(1, 2), y, reduction="none"), None),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_each_example_loss_is_its_own_mean_over_counted_positions(name: str) -> None:
    model, x, y, _ = _data()
    loss_fn, forward = LOSSES[name]
    if name == "module-ignore-7":
        y = torch.where(y == -100, -7, y)
    out = (forward or (lambda m, t: m(t)))(model, x)
    got = per_example_losses(unreduced(loss_fn), out, y, B)
    ignore = -7 if name == "module-ignore-7" else -100
    ref = torch.stack(
        [
            F.cross_entropy(model(x[i : i + 1]).transpose(1, 2), y[i : i + 1], ignore_index=ignore)
            for i in range(B)
        ]
    )
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)


def test_class_weights_weigh_each_example_mean() -> None:
    model, x, y, weight = _data()
    got = per_example_losses(
        unreduced(nn.CrossEntropyLoss(weight=weight)), model(x).transpose(1, 2), y, B
    )
    ref = torch.stack([_alone(weight)(model(x[i : i + 1]), y[i : i + 1]) for i in range(B)])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)


def test_an_example_with_every_position_ignored_adds_nothing() -> None:
    model, x, y, _ = _data()
    y[2] = -100
    got = per_example_losses(unreduced(nn.CrossEntropyLoss()), model(x).transpose(1, 2), y, B)
    assert float(got[2].detach()) == 0.0 and bool(torch.isfinite(got).all())


def test_gram_matches_single_example_gradients_of_each_example_alone() -> None:
    model, x, y, _ = _data()
    got = per_example_gram(model, x, y, nn.CrossEntropyLoss(), forward=_transposed).total
    ref = loop_gram(model, x, y, _alone())
    assert rel_err(got, ref) < 1e-10


def _dense_hessian(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Dense Hessian of (1/B) Σ_i (example i's mean-reduced loss alone)."""
    return dense_hessian_of(
        model,
        x,
        lambda out: torch.stack([_alone()(out[i : i + 1], y[i : i + 1]) for i in range(B)]).mean(),
    )


@pytest.mark.parametrize("name", ["module", "flattening-wrapper"])
def test_sharpness_is_that_of_the_examples_own_means(name: str) -> None:
    model, x, y, _ = _data()
    loss_fn, forward = LOSSES[name]
    ref = torch.linalg.eigvalsh(_dense_hessian(model, x, y)).flip(0)
    got = hessian_eigen(
        model,
        x,
        y,
        loss_fn,
        k=2,
        forward=forward,
        tol=1e-10,
        max_hvps=2000,
        generator=torch.Generator().manual_seed(0),
    )
    assert got.converged
    torch.testing.assert_close(got.eigenvalues, ref[:2], rtol=1e-6, atol=0)
