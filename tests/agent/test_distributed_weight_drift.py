"""Sharded measurement on ranks whose weights differ (``distributed=True``).

A bare module trained on each rank's own batches without gradient synchronisation drifts apart
rank by rank; a sharded measurement would add up Gram rows and Hessian-vector products of
several models (silently: 17 % off on a class-stiffness entry in one such run). Before each
measurement the ranks compare a weight checksum: here they differ, so sharding stops with a
``sharding-off`` warning that says why, and rank 0 measures its own model alone: λ1_H is the
dense float64 Hessian's of rank 0's weights over the whole probe. Under DDP (the same weights)
the measurements stay sharded.
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
    model = nn.parallel.DistributedDataParallel(net) if sys.argv[3] == "ddp" else net
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.arange(16) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = nn.CrossEntropyLoss()
    agent = Agent(model, loss_fn, opt, probe=(x, y), record=sys.argv[1] if rank == 0 else None,
                  endpoint="", registry=False, distributed=True, gram_every="never",
                  sharpness_every=1, density_every="never", overhead_cap=None,
                  hessian_tol=1e-10, max_hvps=200, batch_size=16)
    for step in range(3):
        sl = slice(0, 8) if rank == 0 else slice(8, 16)
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


@pytest.mark.parametrize("wrap", ["bare", "ddp"])
def test_ranks_with_different_weights_do_not_shard(tmp_path: Path, wrap: str) -> None:
    script, rec, weights = tmp_path / "drift.py", tmp_path / "d.stiff", tmp_path / "w.pt"
    script.write_text(_SCRIPT)
    run_ranks(script, str(rec), str(weights), wrap, timeout=60)
    msgs = read_session(rec)[0]
    off = [m for m in msgs if type(m).__name__ == "Event" and m.code == "sharding-off"]
    spectra = [m for m in msgs if type(m).__name__ == "Spectrum" and m.name == "hessian"]
    assert len(spectra) == 3
    if wrap == "ddp":
        assert not off
    else:
        (note,) = off
        assert "the ranks hold different weights at step 0" in note.message
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.arange(16) % 3
    for step, m in enumerate(spectra):
        net.load_state_dict(torch.load(f"{weights}.{step}"))
        h = dense_hessian_of(net, x, lambda out: nn.functional.cross_entropy(out, y))
        ref = float(torch.linalg.eigvalsh(h)[-1])
        assert float(m.values[0]) == pytest.approx(ref, rel=1e-6), f"step {step}"
