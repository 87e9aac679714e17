"""Objectives that differentiate with respect to their inputs, written plainly (no
``torch.enable_grad()``): a gradient penalty, as in score matching, an EBM's Langevin steps or a
WGAN-GP critic. The agent's probe-loss check ran them under ``no_grad``, where they fail, and so
turned the Gram and the sharpness off; it now falls back to grad mode."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from tests.agent.metrics.reference import dense_hessian_of, rel_err
from tests.agent.recording import EXACT, close_and_read, last_scalar, metric_errors, offline_agent

N, D = 10, 3


def leaf_forward(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """s(x) with x a fresh leaf that requires grad."""
    x = x.detach().requires_grad_()
    return model(x), x


def penalised_loss(out: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
    """Per-example ½‖s(x_i) − y_i‖² + ‖∇_x Σ_j s_j(x_i)‖² (create_graph: trained through)."""
    s, x = out
    gx = torch.autograd.grad(s.sum(), x, create_graph=True)[0]
    return 0.5 * ((s - y) ** 2).sum(1) + (gx**2).sum(1)


def test_a_plain_gradient_penalty_is_measured(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, D)).double()
    x, y = torch.randn(N, D, dtype=torch.float64), torch.randn(N, D, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = tmp_path / "r.stiff"
    agent = offline_agent(
        model, penalised_loss, opt, rec, probe=(x, y), forward=leaf_forward, **EXACT
    )
    for _ in range(2):
        opt.zero_grad()
        loss = penalised_loss(leaf_forward(model, x), y).mean()
        loss.backward()
        opt.step()
        agent.step(loss)
    msgs = close_and_read(agent, rec)
    assert not metric_errors(msgs)

    leaf = x.clone().requires_grad_()
    hess = dense_hessian_of(model, leaf, lambda s: penalised_loss((s, leaf), y).mean())
    ref = torch.linalg.eigvalsh(hess)[-1]
    assert rel_err(torch.tensor(last_scalar(msgs, "sharpness/lambda1_h")), ref) < 1e-8
