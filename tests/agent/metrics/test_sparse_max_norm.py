"""``nn.Embedding(max_norm=…)`` (renormalises looked-up rows in place in the forward) in a
sparse two-tower recommender: the Gram goes straight to the exact per-example loop, says why in
plain words (not vmap's ``embedding_renorm_`` error), and equals a float64 single-example loop.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from stiffmon_agent.metrics.gram import per_example_gram

ROWS, D = 3000, 4


class TwoTower(nn.Module):
    """User tower (sparse, padding row 0, max_norm) · item tower (sparse), plus a user bias."""

    def __init__(self) -> None:
        super().__init__()
        self.user = nn.Embedding(ROWS, D, sparse=True, padding_idx=0, max_norm=1.0)
        self.item = nn.Embedding(ROWS, D, sparse=True)
        self.proj = nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        u = self.proj(torch.tanh(self.user(x[:, 0])))
        return (u * self.item(x[:, 1])).sum(-1)


def _reference_gram(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """G[i, j] = g_i·g_j, g_i of (s_i − y_i)² by one backward per example on a dense copy."""
    m = copy.deepcopy(model).eval()
    m.user.sparse = m.item.sparse = False
    params = [p for p in m.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        loss = ((m(x[i : i + 1]) - y[i : i + 1]) ** 2).mean()
        gs = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    g = torch.stack(rows)
    return g @ g.T


def test_max_norm_embedding_gram_is_exact_and_says_why_it_loops() -> None:
    torch.manual_seed(0)
    model = TwoTower().double()
    with torch.no_grad():
        model.user.weight.mul_(4.0)  # most rows above max_norm: the forward rescales them
    x = torch.stack([torch.randint(0, 30, (16,)), torch.randint(0, 30, (16,))], 1)
    x[::4, 0] = 0  # padding users
    y = torch.randn(16)
    before = model.user.weight.detach().clone()
    got = per_example_gram(model, x, y, nn.MSELoss())
    assert torch.equal(model.user.weight.detach(), before)  # the renormalisation is undone
    ref = _reference_gram(model, x, y)
    assert float((got.total - ref).abs().max() / ref.abs().max()) < 1e-12
    assert got.methods["user"] == "loop"
    assert len(got.notes) == 1 and "max_norm=1" in got.notes[0], got.notes
    assert "'user'" in got.notes[0] and "RuntimeError" not in got.notes[0]
    assert model.user.sparse and model.item.sparse
