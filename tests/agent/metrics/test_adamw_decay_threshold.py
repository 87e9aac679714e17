"""AdamW's decoupled weight decay in its preconditioned bound, and λ1(P⁻¹H) for a subclass of
Adam that keeps Adam's step, against references.

The bound's reference is torch's own AdamW stepping on f(x) = ½ λ x² in float64 with P held at
ε = 1 (x tiny, so v ≪ ε²): λ1(P⁻¹H) = λ there, and the bound is right iff AdamW converges at
0.99 × it and diverges at 1.01 × it. With η wd = 0.05 the bound without the decay's factor
(1 − η wd/2) is 2.6 % too high: AdamW diverges at 0.99 × 3800 = 3762 > 3705.
The subclass's λ1(P⁻¹H) is checked against the dense P^{-1/2} H P^{-1/2} from the optimizer's
own state.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from stiffmon_agent.metrics import diagonal_preconditioner, preconditioned_threshold_for
from tests.agent.metrics.reference import dense_hessian_of, quadratic_growth
from tests.agent.recording import (
    EVERY_STEP,
    EXACT,
    close_and_read,
    last_scalar,
    offline_agent,
    train_step,
)

X0 = 1e-20


@pytest.mark.parametrize(
    "make",
    [
        lambda x: torch.optim.AdamW([x], lr=0.01, weight_decay=5.0, eps=1.0),
        lambda x: torch.optim.Adam(
            [x], lr=0.01, weight_decay=5.0, eps=1.0, decoupled_weight_decay=True
        ),
    ],
    ids=["AdamW", "Adam-decoupled"],
)
def test_decoupled_decay_lowers_the_bound_where_adamw_diverges(make) -> None:
    x = nn.Parameter(torch.tensor([X0], dtype=torch.float64))
    bound = preconditioned_threshold_for(make(x))
    assert bound.value == pytest.approx(3800 * (1 - 0.01 * 5.0 / 2), rel=1e-12)
    assert "(1-η·wd/2)" in bound.rule
    for factor, stable in ((0.99, True), (1.01, False)):
        x = nn.Parameter(torch.tensor([X0], dtype=torch.float64))
        final = quadratic_growth(make(x), x, factor * bound.value)
        assert (final < 1e-2) == stable, (factor, final)


class MyAdam(torch.optim.Adam):
    """Keeps Adam's step."""

    def describe(self) -> str:
        return "mine"


def test_a_subclass_of_adam_gets_lambda1_precond(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.arange(10) % 2
    opt = MyAdam(model.parameters(), lr=0.01)
    rec = tmp_path / "sub.stiff"
    settings = EXACT | EVERY_STEP | {"gram_every": "never"}
    agent = offline_agent(model, nn.CrossEntropyLoss(), opt, rec, probe=(x, y), **settings)
    for _ in range(12):  # past Adam's momentum warm-up (1/(1-β1) = 10 steps)
        train_step(agent, opt, nn.functional.cross_entropy(model(x), y))
    msgs = close_and_read(agent, rec)
    p, why = diagonal_preconditioner(opt, list(model.parameters()))
    assert p is not None, why
    h = dense_hessian_of(model, x, lambda out: nn.functional.cross_entropy(out, y))
    s = p.rsqrt()
    want = float(torch.linalg.eigvalsh(s[:, None] * h * s[None, :])[-1])
    assert last_scalar(msgs, "sharpness/lambda1_precond") == pytest.approx(want, rel=1e-6)
    assert last_scalar(msgs, "sharpness/threshold_precond") == pytest.approx(3800.0, rel=1e-12)
