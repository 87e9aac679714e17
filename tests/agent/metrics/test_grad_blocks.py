"""Per-layer per-example gradient blocks (the sharded Gram's input) against a per-example loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stiffmon_agent.metrics.grad_blocks import (
    block_keys,
    blocks_gram_result,
    ghost_cross,
    per_example_grad_blocks,
)
from stiffmon_agent.metrics.gram import per_example_gram
from tests.agent.metrics.models import make_cases
from tests.agent.metrics.reference import loop_gram, rel_err

CASES = make_cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_blocks_give_the_brute_force_gram(name: str) -> None:
    model, x, y = CASES[name]
    loss = nn.CrossEntropyLoss()
    blocks, _ = per_example_grad_blocks(model, x, y, loss, chunk_size=4)
    ref = loop_gram(model, x, y, loss)
    got = blocks_gram_result(blocks)
    assert rel_err(got.total, ref) < 1e-9
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sizes = sum(
        d.dense.shape[1] + sum(a.shape[1] * a.shape[3] * b.shape[3] for a, b in d.factors)
        for d in blocks.values()
    )
    assert sizes == n_params  # every parameter, once
    assert list(blocks) == list(dict.fromkeys(block_keys(model).values()))
    one = per_example_gram(model, x, y, loss)  # the same layer blocks as the one-process Gram
    for key, block in one.layers.items():
        assert rel_err(got.layers[key], block) < 1e-9


def test_mismatch_falls_back_to_the_exact_path() -> None:
    class Coupled(nn.Module):  # couples the examples of a batch: the hook path is wrong
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x - x.mean(0, keepdim=True))

    torch.manual_seed(0)
    model = Coupled().double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1, 0])
    with pytest.warns(RuntimeWarning, match="exact per-example path"):
        blocks, notes = per_example_grad_blocks(model, x, y, nn.CrossEntropyLoss())
    assert notes
    # per example, alone: what the fallback computes (and what per_example_gram gives)
    ref = per_example_gram(model, x, y, nn.CrossEntropyLoss(), method="vmap").total
    assert rel_err(blocks_gram_result(blocks).total, ref) < 1e-9


@pytest.mark.parametrize("name", sorted(CASES))
def test_cross_blocks_of_two_shards(name: str) -> None:
    """What the ranks assemble: G[I1, I2] from two shards' blocks, either form per layer."""
    model, x, y = CASES[name]
    if not isinstance(x, torch.Tensor):
        return
    loss = nn.CrossEntropyLoss()
    ref = loop_gram(model, x, y, loss)
    n = y.shape[0]
    one, _ = per_example_grad_blocks(model, x[:4], y[:4], loss, n_global=n)
    two, _ = per_example_grad_blocks(model, x[4:], y[4:], loss, n_global=n)
    cross = sum(one[k].cross(two[k]) for k in one)
    assert isinstance(cross, torch.Tensor)
    assert rel_err(cross, ref[:4, 4:]) < 1e-9
    assert [g.shapes() for g in one.values()] == [g.shapes() for g in two.values()]


@pytest.mark.parametrize(("groups", "t"), [(1, 1), (3, 1), (1, 5), (2, 4)])
def test_ghost_cross_against_explicit_gradients(groups: int, t: int) -> None:
    g = torch.Generator().manual_seed(groups * 10 + t)
    a = torch.randn(7, groups, t, 5, generator=g, dtype=torch.float64)
    b = torch.randn(7, groups, t, 3, generator=g, dtype=torch.float64)
    grads = torch.einsum("ngto,ngti->ngoi", b, a).reshape(7, -1)  # Σ_t b_i[t] a_i[t]ᵀ
    got = ghost_cross(a[:3], b[:3], a[3:], b[3:])
    assert rel_err(got, grads[:3] @ grads[3:].T) < 1e-12
