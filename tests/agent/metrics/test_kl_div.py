"""KL-divergence losses (distillation): an example's loss is what the training objective makes
of its elements. ``KLDivLoss(reduction="batchmean")`` is the mean over the batch of each
example's sum over classes (not an element mean, which is C times smaller); ``"mean"`` is the
element mean, ``"sum"`` the sum. Per-example Gram and λ1_H against a naive float64 loop and a
dense Hessian of the objective itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon_agent.metrics import hessian_eigen
from stiffmon_agent.metrics.gram import per_example_gram
from stiffmon_agent.metrics.probe import per_example_losses, unreduced
from tests.agent.metrics.reference import dense_hessian_of, loop_gram, rel_err

N, D, C = 10, 5, 6
pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss")


def _setup() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C)).double()
    x = torch.randn(N, D, dtype=torch.float64)
    teacher = torch.softmax(2 * torch.randn(N, C, dtype=torch.float64), dim=-1)
    return model, x, teacher


def _log_probs(model: nn.Module, x: Tensor) -> Tensor:
    return F.log_softmax(model(x), dim=-1)


def _objective(model: nn.Module, x: Tensor, t: Tensor, reduction: str) -> Tensor:
    """The loss as training computes it on the whole batch."""
    return F.kl_div(_log_probs(model, x), t, reduction=reduction)


def _alone(reduction: str) -> float:
    """How much of the objective one example is, times N for a mean (its own loss L_i)."""
    return {"batchmean": 1.0, "mean": 1.0 / C, "sum": 1.0}[reduction]


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_per_example_losses_add_up_to_the_objective(reduction: str) -> None:
    model, x, t = _setup()
    got = per_example_losses(
        unreduced(nn.KLDivLoss(reduction=reduction)), _log_probs(model, x), t, N
    )
    own = torch.stack(
        [F.kl_div(_log_probs(model, x[i : i + 1]), t[i : i + 1], reduction="sum") for i in range(N)]
    )
    torch.testing.assert_close(got, own * _alone(reduction), rtol=1e-12, atol=0)
    whole = _objective(model, x, t, reduction)
    mean_or_sum = got.sum() if reduction == "sum" else got.mean()
    torch.testing.assert_close(mean_or_sum, whole, rtol=1e-12, atol=0)


@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_gram_and_sharpness_match_the_objective(reduction: str) -> None:
    model, x, t = _setup()
    loss_fn = nn.KLDivLoss(reduction=reduction)
    scale = _alone(reduction)
    ref_g = loop_gram(
        model, x, t, lambda out, y: scale * F.kl_div(F.log_softmax(out, -1), y, reduction="sum")
    )
    got_g = per_example_gram(model, x, t, loss_fn, forward=_log_probs).total
    assert rel_err(got_g, ref_g) < 1e-10

    objective = lambda out: F.kl_div(F.log_softmax(out, -1), t, reduction=reduction)  # noqa: E731
    ref = torch.linalg.eigvalsh(dense_hessian_of(model, x, objective))[-1]
    got = hessian_eigen(
        model, x, t, loss_fn, forward=_log_probs, k=1, tol=1e-10, max_hvps=500,  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert float(got.eigenvalues[0]) == pytest.approx(float(ref), rel=1e-8)
