"""Through the agent: a loss normalised over the batch, and a loss through a stop-gradient, are
said on screen, and an ordinary loss is not.

:func:`~stiffmon_agent.metrics.alone_output.alone_loss_hint` and
:func:`~stiffmon_agent.metrics.chunk_coupling.stop_gradient_note` are tested on their own in
``tests/agent/metrics``; these tests check that a measurement reaches them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.agent.metrics.test_contrastive_stop_gradient import encoder, two_views, views_forward
from tests.agent.metrics.test_rl_advantage_normalisation import normalised_inside, policy_loss
from tests.agent.recording import (
    EXACT,
    close_and_read,
    events,
    metric_errors,
    offline_agent,
    train_step,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


class RawPolicy(nn.Module):
    """A policy on raw parameters: no layer the Gram's hook path knows, so its exact paths run
    one example at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(0.3 * torch.randn(6, 3, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w)


def _once(tmp_path: Path, model: nn.Module, x: Tensor, y: object, loss_fn: Any) -> list[Any]:
    """One SGD step on the probe's own mean loss and one ``agent.step``; the recording."""
    rec = tmp_path / "r.stiff"
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = offline_agent(model, loss_fn, opt, rec, probe=(x, y), **EXACT)
    train_step(agent, opt, loss_fn(model(x), y).mean())
    return close_and_read(agent, rec)


@pytest.mark.parametrize("inside", [True, False])
def test_advantages_normalised_in_the_loss_stop_the_gram_with_the_reason(
    tmp_path: Path, inside: bool
) -> None:
    torch.manual_seed(0)
    states = torch.randn(24, 6, dtype=torch.float64)
    actions, returns = torch.randint(0, 3, (24,)), torch.randn(24, dtype=torch.float64)
    adv = (returns - returns.mean()) / returns.std()
    y, fn = ((actions, returns), normalised_inside) if inside else ((actions, adv), policy_loss)
    msgs = _once(tmp_path, RawPolicy(), states, y, fn)
    said = " ".join(metric_errors(msgs).values())
    assert ("not diverging" in said) == inside
    assert "the run is diverging" not in said


def _simsiam(detach: bool):
    def loss(z: Tensor, y: Tensor) -> Tensor:
        a, b = (z[:, 1].detach(), z[:, 0].detach()) if detach else (z[:, 1], z[:, 0])
        return -(F.cosine_similarity(z[:, 0], a, dim=1) + F.cosine_similarity(z[:, 1], b, dim=1))

    return loss


@pytest.mark.parametrize("detach", [True, False])
def test_a_stop_gradient_loss_is_said_once(tmp_path: Path, detach: bool) -> None:
    torch.manual_seed(0)
    views = two_views()
    y = torch.zeros(views.shape[0], dtype=torch.float64)
    rec = tmp_path / "r.stiff"
    model = encoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = _simsiam(detach)
    agent = offline_agent(
        model, loss_fn, opt, rec, probe=(views, y), forward=views_forward, **EXACT
    )
    for _ in range(3):
        train_step(agent, opt, loss_fn(views_forward(model, views), y).mean())
    msgs = close_and_read(agent, rec)
    assert len(events(msgs, "stop-gradient")) == (1 if detach else 0)
