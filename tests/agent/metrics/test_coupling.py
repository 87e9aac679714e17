"""Losses that couple the examples of a batch: said, and refused where nothing is left to measure.

Before the check, an in-batch contrastive (InfoNCE) loss fell back to example-alone gradients,
where each example's loss is 0: Tr K = λ1_K = 0 and stiffness NaN were published as results.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon_agent.metrics import per_example_gram
from stiffmon_agent.metrics.grad_blocks import blocks_gram_result, per_example_grad_blocks
from tests.agent.metrics.reference import loop_gram, rel_err


def info_nce(z: Tensor, y: Tensor) -> Tensor:
    """Per-example InfoNCE over the batch: example i against every other example's embedding."""
    z = F.normalize(z, dim=1)
    return F.cross_entropy(z @ z.T / 0.5, torch.arange(z.shape[0]), reduction="none")


class Scaled(nn.Module):
    """A raw parameter (no Gram rule: the exact vmap path) in an ordinary, uncoupled model."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.s = nn.Linear(5, 4), nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(x)) * self.s


def test_an_in_batch_contrastive_loss_is_refused_with_the_reason() -> None:
    torch.manual_seed(0)
    model = Scaled()
    x, y = torch.randn(12, 5), torch.zeros(12, dtype=torch.long)
    with pytest.raises(ValueError, match="own has no gradient") as info:
        per_example_gram(model, x, y, info_nce, chunk_size=6)
    assert 'gram_every="never"' in str(info.value)


def test_batchnorm_without_running_statistics_gives_example_alone_gradients_and_says_so() -> None:
    """Coupled, but not degenerate: g_i is example i's gradient on its own, as the float64
    reference loop defines it, and a note says the losses are coupled."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2, track_running_stats=False),  # batch statistics even in eval mode
        nn.Flatten(),
        nn.Linear(18, 6),
        Scaled2(),
    )
    model = model.double()
    x = torch.randn(10, 1, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    with pytest.warns(RuntimeWarning, match="coupled across examples"):
        got = per_example_gram(model, x, y, nn.CrossEntropyLoss())
    assert any("coupled across examples" in note for note in got.notes)
    assert rel_err(got.total, loop_gram(model, x, y, nn.CrossEntropyLoss())) < 1e-10


class Scaled2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head, self.s = nn.Linear(6, 3), nn.Parameter(torch.ones(3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x) * self.s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_uncoupled_loss_on_the_exact_path_passes_and_matches_a_loop(dtype: torch.dtype) -> None:
    """No false alarm: a raw parameter takes the example-alone path, and a well-fit probe makes
    the gradients nearly cancel in their sum (the check's hardest case)."""
    torch.manual_seed(0)
    model = Scaled().to(dtype)
    x = torch.randn(64, 5, dtype=dtype)
    y = model(x).argmax(dim=1)  # the model's own predictions: a well-fit probe
    got = per_example_gram(model, x, y, nn.CrossEntropyLoss(), chunk_size=16)
    assert got.methods["(root)"] in ("vmap", "loop")
    want = loop_gram(model, x, y, nn.CrossEntropyLoss())
    assert rel_err(got.total, want) < (1e-4 if dtype == torch.float32 else 1e-10)


def test_the_sharded_gradient_blocks_refuse_an_in_batch_contrastive_loss() -> None:
    """The blocks a sharded Gram is assembled from take the same check on each process's
    examples (before it, InfoNCE under ``distributed=True`` published a zero Gram)."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 5), torch.zeros(12, dtype=torch.long)
    for model in (Scaled(), nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))):
        with pytest.raises(ValueError, match="own has no gradient"):
            per_example_grad_blocks(model, x, y, info_nce, chunk_size=6)


def test_the_sharded_gradient_blocks_note_coupled_losses_and_keep_example_alone_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2, track_running_stats=False),
        nn.Flatten(),
        nn.Linear(18, 6),
        Scaled2(),
    ).double()
    x, y = torch.randn(10, 1, 5, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    with pytest.warns(RuntimeWarning, match="coupled across examples"):
        blocks, notes = per_example_grad_blocks(model, x, y, nn.CrossEntropyLoss())
    assert any("coupled across examples" in note for note in notes)
    got = blocks_gram_result(blocks).total
    assert rel_err(got, loop_gram(model, x, y, nn.CrossEntropyLoss())) < 1e-10


def test_the_sharded_gradient_blocks_of_an_uncoupled_loss_raise_no_note() -> None:
    torch.manual_seed(0)
    model = Scaled().double()
    x = torch.randn(40, 5, dtype=torch.float64)
    y = model(x).argmax(dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        blocks, notes = per_example_grad_blocks(model, x, y, nn.CrossEntropyLoss(), chunk_size=8)
    assert not any("coupled" in note for note in notes)
    got = blocks_gram_result(blocks).total
    assert rel_err(got, loop_gram(model, x, y, nn.CrossEntropyLoss())) < 1e-10
