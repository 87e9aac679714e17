"""Progressive unfreezing with every parameter in the optimizer from the start.

A param group whose parameters all have ``requires_grad=False`` gets no gradients, and torch's
optimizers skip such parameters: the group does not move, whatever its η, so it must set no
stability bound. Before the fix the frozen group's larger η (0.3) gave 2/0.3 = 6.67 instead of
the moving group's 2/0.1 = 20 until the unfreezing. λ1_H is checked against a dense float64
Hessian over the trainable parameters before and after the unfreezing.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from tests.agent.metrics.reference import dense_hessian_of
from tests.agent.recording import close_and_read, offline_agent, train_step


def _lambda1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top eigenvalue of the dense Hessian of the mean cross-entropy over the trainable
    parameters."""
    h = dense_hessian_of(model, x, lambda out: nn.functional.cross_entropy(out, y))
    return float(torch.linalg.eigvalsh(h)[-1])


def test_frozen_group_sets_no_threshold(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dt = torch.float64
    x, y = torch.randn(48, 6, dtype=dt), torch.randint(0, 4, (48,))
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(dt)
    for q in net[0].parameters():
        q.requires_grad_(False)
    opt = torch.optim.SGD(
        [
            {"params": list(net[0].parameters()), "lr": 0.3},
            {"params": list(net[2].parameters()), "lr": 0.1},
        ]
    )
    rec = tmp_path / "unfreeze.stiff"
    agent = offline_agent(
        net, nn.CrossEntropyLoss(), opt, rec, probe=(x[:16], y[:16]), gram_every="never",
        sharpness_every=1, density_every="never", overhead_cap=None, hessian_tol=1e-8,
        max_hvps=200,
    )  # fmt: skip
    ref: dict[int, float] = {}
    for s in range(6):
        if s == 3:
            for q in net[0].parameters():
                q.requires_grad_(True)
        out = net(x[16:])
        train_step(agent, opt, nn.functional.cross_entropy(out, y[16:]), out, y[16:])
        ref[s] = _lambda1(net, x[:16], y[:16])
    got: dict[str, dict[int, float]] = {}
    for m in close_and_read(agent, rec):
        if type(m).__name__ == "Scalars":
            for n, v in zip(m.names, m.values, strict=True):
                got.setdefault(n, {})[m.step] = float(v)
    for s in range(6):
        want = 2 / 0.1 if s < 3 else 2 / 0.3
        assert math.isclose(got["sharpness/threshold"][s], want, rel_tol=1e-12), s
        assert math.isclose(got["sharpness/lambda1_h"][s], ref[s], rel_tol=1e-6), s
