"""A sum-reduced loss under DDP with uneven batches per rank (``distributed=True``).

DDP averages the ranks' gradients, g = (1/W) Σ_r ∇L_r, so with L_r = Σ_{i∈r} ℓ_i the objective a
step descends is F = (1/W) Σ_r Σ_{i∈r} ℓ_i = (B/W) × the mean over the B = Σ_r b_r examples of
the step. B and ``sum_over`` used to be read from rank 0's logits alone (B = W b_0,
``sum_over`` = b_0): with b = (8, 12) λ1_H came out 20 % low, with (12, 8) 20 % high.

The probe is the step's examples themselves (rank r's batch a slice of it), so the reference is
exact: the dense float64 Hessian of F over the probe at the weights after each step.
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

SPLITS = ((8, 12), (12, 8), (7, 12))  # rank 0's and rank 1's batch at steps 0, 1, 2

_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch, torch.distributed as dist
    from torch import nn
    from stiffmon_agent import Agent

    SPLITS = ((8, 12), (12, 8), (7, 12))
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model = nn.parallel.DistributedDataParallel(net)
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.arange(20) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    agent = Agent(model, loss_fn, opt, probe=(x, y), record=sys.argv[1] if rank == 0 else None,
                  endpoint="", registry=False, distributed=True, gram_every="never",
                  sharpness_every=1, density_every="never", overhead_cap=None,
                  hessian_tol=1e-10, max_hvps=200)
    for step, (b0, b1) in enumerate(SPLITS):
        sl = slice(0, b0) if rank == 0 else slice(b0, b0 + b1)
        out = model(x[sl])
        loss = loss_fn(out, y[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
        agent.step(loss, out, y[sl])
        if rank == 0:
            torch.save(net.state_dict(), f"{sys.argv[2]}.{step}")
    agent.close()
    print(f"rank {rank} done", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _lambda1(net: nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float) -> float:
    """Top eigenvalue of the dense Hessian of ``scale`` × the mean cross-entropy over ``x``."""
    h = dense_hessian_of(net, x, lambda out: scale * nn.functional.cross_entropy(out, y))
    return float(torch.linalg.eigvalsh(h)[-1])


def test_lambda1_of_a_sum_loss_with_uneven_batches(tmp_path: Path) -> None:
    script, rec, weights = tmp_path / "uneven.py", tmp_path / "u.stiff", tmp_path / "w.pt"
    script.write_text(_SCRIPT)
    run_ranks(script, str(rec), str(weights), timeout=60)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.arange(20) % 3
    spectra = [
        m for m in read_session(rec)[0] if type(m).__name__ == "Spectrum" and m.name == "hessian"
    ]
    assert len(spectra) == len(SPLITS)
    for step, ((b0, b1), m) in enumerate(zip(SPLITS, spectra, strict=True)):
        net.load_state_dict(torch.load(f"{weights}.{step}"))
        # (B/W) × the mean over the probe; where the step's B examples are the whole probe
        # (steps 0 and 1) that is the DDP objective (1/W) Σ_r Σ_{i∈r} ℓ_i itself
        ref = _lambda1(net, x, y, (b0 + b1) / 2)
        assert m.attrs["objective"] == f"sum over {(b0 + b1) / 2:g} examples"
        assert float(m.values[0]) == pytest.approx(ref, rel=1e-6), f"step {step}"
