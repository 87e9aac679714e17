"""A sum-reduced loss under DDP with ``batch_size=`` given (the global batch B): DDP averages
the ranks' gradients, so the objective a step descends adds up one rank's batch, B / W, and λ1_H
is that of B / W × the per-example mean. ``sum_over`` used to be derived only from the logits,
so with ``batch_size=`` given λ1_H came out W times too high (11.85 against 5.93).

Checked against the dense float64 Hessian of the mean loss over the probe, × B / W.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from stiffmon.session import read_session
from tests.agent.metrics.reference import dense_hessian_of
from tests.agent.torchrun import run_ranks

_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch, torch.distributed as dist
    from torch import nn
    from stiffmon_agent import Agent

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model = nn.parallel.DistributedDataParallel(net)
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.arange(12) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    agent = Agent(model, loss_fn, opt, probe=(x, y), record=sys.argv[1] if rank == 0 else None,
                  endpoint="", registry=False, batch_size=10, gram_every="never",
                  sharpness_every=1, density_every="never", overhead_cap=None,
                  hessian_tol=1e-10, max_hvps=200)
    g = torch.Generator().manual_seed(rank)
    xb, yb = torch.randn(5, 4, dtype=torch.float64, generator=g), torch.arange(5) % 3
    loss = loss_fn(model(xb), yb)
    opt.zero_grad()
    loss.backward()
    opt.step()
    agent.step(loss)
    agent.close()
    if rank == 0:
        torch.save(net.state_dict(), sys.argv[2])
    print(f"rank {rank} done", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _lambda1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top eigenvalue of the dense Hessian of the mean cross-entropy over the trainable
    parameters."""
    h = dense_hessian_of(model, x, lambda out: nn.functional.cross_entropy(out, y))
    return float(torch.linalg.eigvalsh(h)[-1])


def test_lambda1_of_a_sum_loss_with_the_global_batch_given(tmp_path: Path) -> None:
    script, rec, weights = tmp_path / "sum.py", tmp_path / "sum.stiff", tmp_path / "w.pt"
    script.write_text(_SCRIPT)
    run_ranks(script, str(rec), str(weights))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.arange(12) % 3
    net.load_state_dict(torch.load(weights))
    (lam,) = [
        float(m.values[m.names.index("sharpness/lambda1_h")])
        for m in read_session(rec)[0]
        if type(m).__name__ == "Scalars" and "sharpness/lambda1_h" in m.names
    ]
    assert lam == pytest.approx(5 * _lambda1(net, x, y), rel=1e-6)
