"""In-batch contrastive objectives through the agent: what can be measured is right, what cannot
is said.

SimCLR's NT-Xent couples every example to the batch: an example's two views alone have only each
other, the loss is log 1 = 0 and no per-example gradient exists. The Gram (stiffness, noise) is
refused with a ``metric-error`` saying so; λ1_H of the probe objective (the whole probe as one
batch) matches a float64 dense Hessian.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.agent.metrics.reference import dense_hessian_of
from tests.agent.recording import (
    EXACT,
    close_and_read,
    last_scalar,
    metric_errors,
    offline_agent,
    scalar_values,
    train_step,
)


def nt_xent(z: Tensor, y: Tensor, tau: float = 0.5) -> Tensor:
    """Per-pair NT-Xent over the batch: z is (n, 2, d), rows 2i and 2i + 1 a positive pair."""
    n = z.shape[0]
    z = F.normalize(z.flatten(0, 1), dim=1)
    sim = (z @ z.T / tau).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    return F.cross_entropy(sim, torch.arange(2 * n) ^ 1, reduction="none").view(n, 2).mean(1)


def views(n: int) -> Tensor:
    x = torch.randn(n, 8, dtype=torch.float64)
    return x[:, None] + 0.1 * torch.randn(n, 2, 8, dtype=torch.float64)


def test_nt_xent_refuses_the_gram_and_measures_lambda1_h(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6)).double()
    fwd = lambda m, v: m(v.flatten(0, 1)).view(v.shape[0], 2, -1)  # noqa: E731
    probe = (views(16), torch.zeros(16, dtype=torch.float64))
    opt = torch.optim.SGD(enc.parameters(), lr=0.05)
    rec = tmp_path / "c.stiff"
    agent = offline_agent(enc, nt_xent, opt, rec, probe=probe, forward=fwd, **EXACT)
    for _ in range(2):
        v = views(32)
        train_step(agent, opt, nt_xent(fwd(enc, v), v).mean())
    msgs = close_and_read(agent, rec)
    assert "own has no gradient" in metric_errors(msgs)["gram"]
    assert not scalar_values(msgs, "noise/trace_k")  # no zeros published as results
    enc.eval()
    hess = dense_hessian_of(
        enc, probe[0].flatten(0, 1), lambda z: nt_xent(z.view(16, 2, -1), probe[1]).mean()
    )
    want = float(torch.linalg.eigvalsh(hess)[-1])
    assert abs(last_scalar(msgs, "sharpness/lambda1_h") / want - 1) < 1e-8
