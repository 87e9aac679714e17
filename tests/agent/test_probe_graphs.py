"""A probe whose examples are not rows of its tensors (a batched graph) is told what to pass.

A PyTorch-Geometric-style batch — node features (nodes, F), edge_index (2, E), the graph of each
node (nodes,), one label per graph — has no common example dimension. The error names the
shapes and the way out (example indices as the probe's inputs, the batch built in
``forward=``), and that way measures each graph's own gradient, against a float64 loop.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon_agent.metrics.gram import per_example_gram
from stiffmon_agent.probe_set import make_probe


class _GraphNet(nn.Module):
    """One message-passing layer (index_add_ over edges), mean pooling per graph, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.own, self.nbr, self.head = (
            nn.Linear(3, 5),
            nn.Linear(3, 5, bias=False),
            nn.Linear(5, 2),
        )

    def forward(self, x: Tensor, edges: Tensor, graph: Tensor, n_graphs: int) -> Tensor:
        agg = torch.zeros_like(x).index_add_(0, edges[1], x[edges[0]])
        h = torch.tanh(self.own(x) + self.nbr(agg))
        pooled = torch.zeros(n_graphs, 5, dtype=x.dtype).index_add_(0, graph, h)
        count = torch.zeros(n_graphs, dtype=x.dtype).index_add_(0, graph, torch.ones_like(h[:, 0]))
        out: Tensor = self.head(pooled / count[:, None])
        return out


def _graphs(n: int) -> list[tuple[Tensor, Tensor, int]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for k in range(n):
        nodes = 3 + k % 3
        x = torch.randn(nodes, 3, dtype=torch.float64, generator=gen)
        out.append((x, torch.randint(0, nodes, (2, 2 * nodes), generator=gen), k % 2))
    return out


def _collate(graphs: list[tuple[Tensor, Tensor, int]]) -> tuple[Tensor, Tensor, Tensor, int]:
    xs, es, gs, offset = [], [], [], 0
    for k, (x, e, _) in enumerate(graphs):
        xs.append(x)
        es.append(e + offset)
        gs.append(torch.full((len(x),), k))
        offset += len(x)
    return torch.cat(xs), torch.cat(es, 1), torch.cat(gs), len(graphs)


def test_a_batched_graph_probe_is_told_to_pass_indices() -> None:
    graphs = _graphs(6)
    x, e, g, _ = _collate(graphs)
    y = torch.tensor([lab for _, _, lab in graphs])
    with pytest.raises(ValueError) as info:
        make_probe(((x, e, g), y), None, None, None, None)
    message = str(info.value)
    assert f"{tuple(x.shape)}" in message and f"{tuple(e.shape)}" in message
    assert "probe=(torch.arange(N), targets)" in message and "forward=" in message


def test_graph_indices_as_the_probe_give_each_graph_s_own_gradient() -> None:
    torch.manual_seed(1)
    model = _GraphNet().double()
    graphs = _graphs(8)
    y = torch.tensor([lab for _, _, lab in graphs])

    def forward(m: nn.Module, idx: Tensor) -> Tensor:
        out: Tensor = m(*_collate([graphs[int(i)] for i in idx]))
        return out

    got = per_example_gram(model, torch.arange(8), y, nn.CrossEntropyLoss(), forward=forward)
    params = list(model.parameters())
    rows = []
    for x, e, lab in graphs:  # each graph alone, in float64
        loss = F.cross_entropy(
            model(x, e, torch.zeros(len(x), dtype=torch.long), 1), torch.tensor([lab])
        )
        rows.append(torch.cat([q.reshape(-1) for q in torch.autograd.grad(loss, params)]))
    ref = torch.stack(rows) @ torch.stack(rows).T
    assert torch.allclose(got.total, ref, rtol=1e-10, atol=1e-14)
