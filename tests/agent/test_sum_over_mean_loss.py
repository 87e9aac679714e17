"""``sum_over=`` with a mean-reduced loss: the user's value is ignored and says so, the
integrations' own default is silent; with a sum-reduced loss it scales the sharpness.

References (float64): the dense Hessian of the probe's mean loss (1/N) Σ_i L_i, H_mean; a
mean-reduced objective's λ1_H is λ_max(H_mean) whatever ``sum_over`` says, a sum-reduced one's
over m examples is m λ_max(H_mean).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from stiffmon_agent.sum_over_option import FrameworkSumOver, framework_sum_over
from tests.agent.metrics.reference import dense_hessian_of, rel_err
from tests.agent.recording import (
    EXACT,
    close_and_read,
    events,
    last_scalar,
    offline_agent,
    train_step,
)

N = 12


def _setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(N, 4, dtype=torch.float64)
    return model, x, torch.arange(N) % 3


def _lambda1_mean(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    h = dense_hessian_of(model, x, lambda out: nn.functional.cross_entropy(out, y))
    return float(torch.linalg.eigvalsh(h)[-1])


def _run(tmp_path: Path, reduction: str, sum_over: Any) -> list[Any]:
    model, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # θ stays the reference's
    rec = tmp_path / f"{reduction}-{sum_over!r}.stiff"
    agent = offline_agent(
        model, nn.CrossEntropyLoss(reduction=reduction), opt, rec, probe=(x, y),
        sum_over=sum_over, batch_size=32, **EXACT,
    )  # fmt: skip
    out = model(x)
    train_step(agent, opt, nn.functional.cross_entropy(out, y), out, y)
    return close_and_read(agent, rec)


def test_a_users_sum_over_with_a_mean_loss_warns_and_changes_nothing(tmp_path: Path) -> None:
    """The warning names the value and the loss; λ1_H is the mean objective's either way."""
    model, x, y = _setup()
    ref = _lambda1_mean(model, x, y)
    msgs = _run(tmp_path, "mean", 4)
    (w,) = events(msgs, "sum-over-ignored")
    assert w.level == "warning"
    assert "sum_over=4 is ignored" in w.message and 'reduction="mean"' in w.message
    ours = last_scalar(msgs, "sharpness/lambda1_h")
    plain = last_scalar(_run(tmp_path, "mean", None), "sharpness/lambda1_h")
    err = rel_err(torch.tensor(ours), torch.tensor(ref))
    print(f"mean loss, sum_over=4: λ1 ours {ours:.12g} vs float64 dense {ref:.12g} ({err:.1e})")
    assert err < 1e-8 and ours == pytest.approx(plain, rel=1e-12)


def test_the_integrations_default_sum_over_is_silent(tmp_path: Path) -> None:
    """A framework's default (a :class:`FrameworkSumOver`) with a mean loss: no warning; no
    sum_over: no warning."""
    for given in (framework_sum_over(4), None):
        assert not events(_run(tmp_path, "mean", given), "sum-over-ignored")
    assert framework_sum_over(None) is None and isinstance(framework_sum_over(4), int)


def test_sum_over_with_a_sum_loss_scales_the_sharpness_silently(tmp_path: Path) -> None:
    """A sum-reduced loss over m = 4 examples (a user's or a framework's value): λ1_H is
    4 λ_max(H_mean), and nothing warns."""
    model, x, y = _setup()
    ref = 4 * _lambda1_mean(model, x, y)
    for given in (4, FrameworkSumOver(4)):
        msgs = _run(tmp_path, "sum", given)
        assert not events(msgs, "sum-over-ignored")
        ours = last_scalar(msgs, "sharpness/lambda1_h")
        err = rel_err(torch.tensor(ours), torch.tensor(ref))
        print(
            f"sum loss, sum_over={given!r}: λ1 ours {ours:.12g} vs 4·dense {ref:.12g} ({err:.1e})"
        )
        assert err < 1e-8


def test_a_plain_callable_is_told_how_to_say_it_sums(tmp_path: Path) -> None:
    """A per-example callable without a ``reduction`` attribute is taken as mean-reduced: the
    warning says so and how to mark it as summed; with ``reduction = "sum"`` it is silent."""
    model, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def per_example(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, t, reduction="none")

    for summed in (False, True):
        if summed:
            per_example.reduction = "sum"  # type: ignore[attr-defined]
        rec = tmp_path / f"callable-{summed}.stiff"
        agent = offline_agent(model, per_example, opt, rec, probe=(x, y), sum_over=4)
        msgs = close_and_read(agent, rec)
        said = events(msgs, "sum-over-ignored")
        if summed:
            assert not said
        else:
            assert len(said) == 1 and 'reduction = "sum" attribute' in said[0].message


def test_an_invalid_sum_over_still_raises(tmp_path: Path) -> None:
    model = _setup()[0]
    for bad in (0, -2):
        with pytest.raises(ValueError, match="sum_over must be a positive number"):
            offline_agent(model, nn.CrossEntropyLoss(), None, tmp_path / "x.stiff", sum_over=bad)
