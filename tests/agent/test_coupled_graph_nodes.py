"""A node-classification GCN measured through node indices: every Gram entry, not just the
checked ones.

``probe=(node_idx, y)`` with ``forward=lambda m, i: m(x, adj)[i]``: the GCN's Linear layers see
the graph's nodes as rows, so a hook-path Gram over those rows is not the per-node-loss Gram.
With the whole graph as the probe the row count equals the number of examples, and where the
first, middle and last nodes are isolated, their entries of the row Gram are exact: the entry
check passed and Tr K came out 60 % low, the stiffness of the wrong sign, without a warning.
Each number is compared with a float64 loop over the nodes' own losses and a dense Hessian.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon_agent.metrics.gram import per_example_gram
from tests.agent.metrics.reference import loop_gradients, rel_err

NODES, FEATURES, CLASSES = 16, 4, 3


class GCN(nn.Module):
    """Two graph convolutions Â·Linear(·) with a dense normalised adjacency Â."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(FEATURES, 8), nn.Linear(8, CLASSES)

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        out: Tensor = adj @ self.l2(torch.tanh(adj @ self.l1(x)))
        return out


def isolated_graph(isolated: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """Node features, Â and labels of a random graph whose nodes ``isolated`` have no edge."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(NODES, FEATURES, dtype=torch.float64, generator=gen)
    a = (torch.rand(NODES, NODES, generator=gen) < 0.3).double()
    a = ((a + a.T) > 0).double()
    for k in isolated:
        a[k, :] = 0
        a[:, k] = 0
    a.fill_diagonal_(1)
    d = a.sum(1)
    y = torch.randint(0, CLASSES, (NODES,), generator=gen)
    return x, a / torch.sqrt(d[:, None] * d[None, :]), y


def _trace_k(g: Tensor) -> float:
    return float(((g - g.mean(0)) ** 2).sum(1).mean())


def test_isolated_checked_nodes_do_not_hide_a_wrong_node_gram() -> None:
    x, adj, y = isolated_graph(isolated=(0, NODES // 2, NODES - 1))
    torch.manual_seed(1)
    model = GCN().double()
    idx = torch.arange(NODES)

    def forward(m: nn.Module, i: Tensor) -> Tensor:
        out: Tensor = m(x, adj)[i]
        return out

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gram = per_example_gram(model, idx, y, nn.CrossEntropyLoss(), forward=forward)
    rows = loop_gradients(model, idx, y, F.cross_entropy, forward)
    ref = rows @ rows.T
    assert rel_err(gram.total, ref) < 1e-10
    assert math.isclose(
        _trace_k(rows), float(gram.total.trace() / NODES - gram.total.mean()), rel_tol=1e-10
    )
    assert any("not the examples' own gradients" in str(w.message) for w in caught)


def test_a_node_gram_of_a_connected_graph_matches_the_loop_without_a_false_alarm_on_mlps() -> None:
    x, adj, y = isolated_graph(isolated=())
    torch.manual_seed(2)
    model = GCN().double()
    idx = torch.tensor([0, 3, 5, 7, 9, 11, 12, 14, 15])

    def forward(m: nn.Module, i: Tensor) -> Tensor:
        out: Tensor = m(x, adj)[i]
        return out

    gram = per_example_gram(model, idx, y[idx], nn.CrossEntropyLoss(), forward=forward)
    rows = loop_gradients(model, idx, y[idx], F.cross_entropy, forward)
    assert rel_err(gram.total, rows @ rows.T) < 1e-10
    mlp = nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES))
    for dtype in (torch.float32, torch.float64):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # independent rows: no fallback warning
            g = per_example_gram(mlp.to(dtype), x.to(dtype), y, nn.CrossEntropyLoss())
        assert g.methods and set(g.methods.values()) <= {"ghost", "materialise"}


def test_every_measurement_of_the_node_gram_is_right_not_only_the_first() -> None:
    """The batch check runs at the first fast Gram and every 10th: once it has failed for a
    model it runs at every one, so measurements 2..10 do not go back to the wrong row Gram."""
    x, adj, y = isolated_graph(isolated=(0, NODES // 2, NODES - 1))
    torch.manual_seed(3)
    model = GCN().double()
    idx = torch.arange(NODES)

    def forward(m: nn.Module, i: Tensor) -> Tensor:
        out: Tensor = m(x, adj)[i]
        return out

    rows = loop_gradients(model, idx, y, F.cross_entropy, forward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            gram = per_example_gram(model, idx, y, nn.CrossEntropyLoss(), forward=forward)
            assert rel_err(gram.total, rows @ rows.T) < 1e-10
