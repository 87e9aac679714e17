"""Agent(distributed=True) refuses probes that hold the same examples in another order per rank.

Rank r measures the examples ``[⌊rN/W⌋, ⌊(r+1)N/W⌋)`` of *its* probe: with the examples in
another order on another rank (a probe shuffled with a rank-dependent seed) the shards overlap
and miss examples, and every Gram figure would be silently wrong. The setup check's checksum
used to be the sum of the values (blind to the order): it must tell the ranks' orders apart.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

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
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 3))
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    if sys.argv[1] == "reversed" and rank == 1:  # the same examples, another order
        x, y = x.flip(0), y.flip(0)
    try:
        agent = Agent(model, nn.CrossEntropyLoss(), probe=(x, y), endpoint="", registry=False,
                      distributed=True, rank_timeout=20.0)
        agent.close()
        print(f"rank {rank} done, accepted", flush=True)
    except ValueError as exc:
        print(f"rank {rank} done, refused: {exc}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.parametrize("order", ["same", "reversed"])
def test_a_probe_in_another_order_on_one_rank_is_refused(tmp_path: Path, order: str) -> None:
    script = tmp_path / "order.py"
    script.write_text(_SCRIPT)
    out = run_ranks(script, order)
    if order == "same":
        assert "rank 0 done, accepted" in out and "rank 1 done, accepted" in out, out
    else:
        for r in range(2):
            assert f"rank {r} done, refused: Agent(distributed=True) needs" in out, out
        assert "same global probe" in out
