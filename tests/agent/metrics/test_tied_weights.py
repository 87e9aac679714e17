"""Weights tied between modules (a language model's embedding and output head) take the hook
path: each use's per-example gradient is materialised, the uses are summed, and the Gram holds
their cross terms. Before, the tied weight took vmap (10× slower on a small LM) or the per-example
loop (Hugging Face GPT-2). Every case against the float64 per-example loop."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from stiffmon_agent.metrics import per_example_gram
from stiffmon_agent.metrics.grad_blocks import blocks_gram_result, per_example_grad_blocks
from tests.agent.metrics.reference import loop_gram, rel_err


def token_loss(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(dim=1)


class TiedLM(nn.Module):
    """Embedding → Linear → head whose weight is the embedding's (optionally a padding row,
    a head bias, and a head called seq-first, which the Linear rule cannot take)."""

    def __init__(self, padding_idx: int | None = None, seq_first_head: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8, padding_idx=padding_idx)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 30)
        self.head.weight = self.emb.weight
        self.seq_first_head = seq_first_head

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.emb(x)))
        if self.seq_first_head:
            return self.head(h.transpose(0, 1)).transpose(0, 1)
        return self.head(h)


class OwnHead(nn.Module):
    """A head module with no Gram rule that owns the embedding's weight."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, h: Tensor) -> Tensor:
        return h @ self.weight.T


class RulelessTie(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.mix = nn.Linear(8, 8)
        self.head = OwnHead(self.emb.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.emb(x))))


def data(n: int = 12, t: int = 5) -> tuple[Tensor, Tensor]:
    torch.manual_seed(1)
    x = torch.randint(0, 30, (n, t))
    x[:, -1] = 0  # the padding row, where there is one
    return x, torch.randint(0, 30, (n, t))


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("chunk", [None, 5])
def test_a_tied_embedding_and_head_take_the_hook_path_and_match_the_loop(
    padding_idx: int | None, chunk: int | None
) -> None:
    torch.manual_seed(0)
    model = TiedLM(padding_idx).double()
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no mismatch warning
        got = per_example_gram(model, x, y, token_loss, chunk_size=chunk)
    assert got.methods["emb"] == "materialise"  # the tied weight, under its first name
    assert got.methods["head"] in ("ghost", "materialise")  # the head's own bias
    want = loop_gram(model, x, y, token_loss)
    assert rel_err(got.total, want) < 1e-10
    assert rel_err(sum(got.layers.values()), want) < 1e-10


def test_weights_tied_between_linear_layers_match_the_loop() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    model[2].weight = model[0].weight
    model = model.double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    got = per_example_gram(model, x, y, nn.CrossEntropyLoss(), chunk_size=4)
    assert got.methods["0"] == "materialise"
    assert rel_err(got.total, loop_gram(model, x, y, nn.CrossEntropyLoss())) < 1e-10


def test_a_tie_with_a_module_without_a_rule_leaves_the_weight_to_the_exact_path() -> None:
    torch.manual_seed(0)
    model = RulelessTie().double()
    x, y = data()
    got = per_example_gram(model, x, y, token_loss)
    assert got.methods["emb"] in ("vmap", "loop")
    assert rel_err(got.total, loop_gram(model, x, y, token_loss)) < 1e-10


def test_a_use_that_fails_the_hook_pass_sends_every_use_of_the_weight_to_the_exact_path() -> None:
    """The head called seq-first (T ≠ N) fails its rule: the embedding's use alone must not be
    counted as the weight's gradient."""
    torch.manual_seed(0)
    model = TiedLM(seq_first_head=True).double()
    x, y = data(n=12, t=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not caught by the safety net: never wrong
        got = per_example_gram(model, x, y, token_loss, chunk_size=6)
    assert got.methods["emb"] in ("vmap", "loop")
    assert got.methods["mix"] in ("ghost", "materialise")
    assert rel_err(got.total, loop_gram(model, x, y, token_loss)) < 1e-10


@pytest.mark.parametrize("model", [TiedLM(), TiedLM(padding_idx=0), RulelessTie()])
def test_the_sharded_gradient_blocks_of_tied_weights_match_the_loop(model: nn.Module) -> None:
    torch.manual_seed(0)
    model = model.double()
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        blocks, _ = per_example_grad_blocks(model, x, y, token_loss, chunk_size=5)
    got = blocks_gram_result(blocks).total
    assert rel_err(got, loop_gram(model, x, y, token_loss)) < 1e-10
