"""The sharded Gram (``Agent(distributed=True)``) of a graph network measured through node
indices: the weighted-sum check runs on every rank, not only the entry check.

``probe=(node_idx, y)`` with ``forward=lambda m, i: m(x, adj)[i]``: the GCN's Linear layers see
the graph's 16 nodes as rows. With 32 probe entries on 2 ranks (the nodes 0..15 on each rank)
every rank's row count equals its number of examples, and with the first, middle and last nodes
isolated the checked entries of each rank's row Gram are exact: before the weighted-sum check
reached the sharded path, the published cosines were those of the row Gram (far off the nodes'
own gradients) without a warning. Compared with a float64 loop over the nodes' own losses.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon import protocol as p
from stiffmon.session import read_session
from tests.agent.metrics.reference import loop_gradients
from tests.agent.test_coupled_graph_nodes import GCN, NODES, isolated_graph
from tests.agent.torchrun import run_ranks

_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch, torch.distributed as dist
    from torch import nn
    from stiffmon_agent import Agent
    sys.path.insert(0, sys.argv[3])
    from test_shardcheck_sharded_sum import GCN, graph, probe

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    x, adj, y = graph()
    torch.manual_seed(1)
    model = GCN().double()
    idx, targets = probe(y)

    def forward(m, i):
        return m(x, adj)[i]

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = Agent(model, nn.CrossEntropyLoss(), opt, probe=(idx, targets), forward=forward,
                  record=sys.argv[1] if rank == 0 else None, endpoint="", registry=False,
                  distributed=True, gram_every=1, sharpness_every="never",
                  density_every="never", overhead_cap=None, chunk_size=16)
    for step in range(3):
        loss = nn.functional.cross_entropy(forward(model, idx[:16]), targets[:16])
        opt.zero_grad()
        loss.backward()
        opt.step()
        agent.step(loss)
        if rank == 0:
            torch.save(model.state_dict(), f"{sys.argv[2]}.{step}")
    agent.close()
    print(f"rank {rank} done", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    """
)

ISOLATED = (0, NODES // 2, NODES - 1)


def graph() -> tuple[Tensor, Tensor, Tensor]:
    """Node features, Â and labels of a random graph whose nodes :data:`ISOLATED` have no edge."""
    return isolated_graph(ISOLATED)


def probe(y: Tensor) -> tuple[Tensor, Tensor]:
    """Every node twice: each rank's shard is nodes 0..15, as many as the rows the layers see."""
    idx = torch.cat([torch.arange(NODES), torch.arange(NODES)])
    return idx, y[idx]


def _noise(rows: Tensor) -> dict[str, float]:
    """From the float64 per-example gradients ``rows``: Tr K = mean_i ‖g_i − ḡ‖², tr Σ =
    Σ_i ‖g_i − ḡ‖² / (N − 1) and the unbiased ‖G‖² = ‖ḡ‖² − tr Σ / N."""
    n, mean = rows.shape[0], rows.mean(0)
    dev = float((rows - mean).square().sum())
    return {
        "noise/trace_k": dev / n,
        "noise/trace_sigma": dev / (n - 1),
        "noise/grad_sq": float(mean.square().sum()) - dev / (n - 1) / n,
    }


def test_a_node_gram_sharded_over_two_ranks_is_the_nodes_own_not_the_rows(tmp_path: Path) -> None:
    script, rec, weights = tmp_path / "gcn.py", tmp_path / "gcn.stiff", tmp_path / "w.pt"
    script.write_text(_SCRIPT)
    run_ranks(script, str(rec), str(weights), str(Path(__file__).parent))
    msgs = read_session(rec)[0]
    x, adj, y = graph()
    idx, targets = probe(y)

    def forward(m: nn.Module, i: Tensor) -> Tensor:
        out: Tensor = m(x, adj)[i]
        return out

    scalars: dict[int, dict[str, float]] = {}
    for m in msgs:
        if isinstance(m, p.Scalars) and "noise/trace_k" in m.names:
            scalars[m.step] = m.as_dict()
    assert sorted(scalars) == [0, 1, 2]  # every measurement, not only the first
    for step, got in scalars.items():
        model = GCN().double()
        model.load_state_dict(torch.load(f"{weights}.{step}"))
        ref = _noise(loop_gradients(model, idx, targets, F.cross_entropy, forward))
        for name, want in ref.items():
            err = abs(got[name] - want) / abs(want)
            print(f"step {step} {name}: ours {got[name]:.12g} vs loop {want:.12g} ({err:.1e})")
            assert err < 1e-9, (step, name)
    said = [m for m in msgs if isinstance(m, p.Event) and m.code == "gram-fallback"]
    assert said and "not the examples' own gradients" in said[0].message
