"""Uneven inputs under ``Join([model, agent])``: rank 0 has 3 batches, rank 1 has 2.

At step 2 rank 1 has joined: DDP matches rank 0's gradient all-reduce with zeros and divides by
W = 2, so a step descends F = (1/W) Σ_{i∈rank 0's batch} ℓ_i, and λ1_H is that of b_0 / W = 2.5
× the per-example mean. Rank 1's agent takes part in the step's measurement through its join
hook, with rank 0's weights (its own optimizer stood still). Without the agent in the ``Join``
rank 0 waited ``rank_timeout`` at that measurement, stopped sharding, and measured λ1_H twice too
high (``sum_over`` = b_0 from its own logits); with the joined rank's stale weights the sharded
product was wrong too.

The probe is rank 0's step-2 batch itself, so the reference is exact: the dense float64 Hessian
of F at the weights after step 2. The agent may not come first in the ``Join`` (the first
joinable's all-reduce must come before the step's gradient all-reduce): a clear error.
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
    from torch.distributed.algorithms.join import Join
    from stiffmon_agent import Agent
    from stiffmon_agent.schedules import EveryK

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model = nn.parallel.DistributedDataParallel(net)
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.arange(30) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    at2 = EveryK(10**6, start=2)
    agent = Agent(model, loss_fn, opt, probe=(x[20:25], y[20:25]), val_probe=(x[25:], y[25:]),
                  record=sys.argv[1] if rank == 0 else None, endpoint="", registry=False,
                  distributed=True, gram_every=at2, sharpness_every=at2, density_every="never",
                  overhead_cap=None, hessian_tol=1e-10, max_hvps=200, rank_timeout=5)
    try:
        Join([agent, model])
    except ValueError as exc:
        print(f"rank {rank} refused: {exc}", flush=True)
    batches = [(0, 5), (10, 15), (20, 25)] if rank == 0 else [(5, 10), (15, 20)]
    with Join([model, agent]):
        for a, b in batches:
            out = model(x[a:b])
            loss = loss_fn(out, y[a:b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            agent.step(loss, out, y[a:b])
    if rank == 0:
        torch.save(net.state_dict(), sys.argv[2])
    agent.close()
    print(f"rank {rank} done", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_a_joined_rank_measures_its_share_with_the_current_weights(tmp_path: Path) -> None:
    script, rec, weights = tmp_path / "join.py", tmp_path / "j.stiff", tmp_path / "w.pt"
    script.write_text(_SCRIPT)
    out = run_ranks(script, str(rec), str(weights), timeout=60)
    for r in (0, 1):
        assert f"rank {r} refused: Join([model, agent]): the DDP model must come before" in out
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.arange(30) % 3
    net.load_state_dict(torch.load(weights))
    msgs = read_session(rec)[0]
    assert not [m for m in msgs if type(m).__name__ == "Event" and m.code == "sharding-off"]
    (spectrum,) = [m for m in msgs if type(m).__name__ == "Spectrum" and m.name == "hessian"]
    assert spectrum.step == 2
    assert spectrum.attrs["objective"] == "sum over 2.5 examples"
    h = dense_hessian_of(
        net, x[20:25], lambda o: nn.functional.cross_entropy(o, y[20:25], reduction="sum") / 2
    )
    assert float(spectrum.values[0]) == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), 1e-6)
    assert any(type(m).__name__ == "Matrix" and m.step == 2 for m in msgs)  # the Gram too
