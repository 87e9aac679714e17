"""Hugging Face's GPT-2 layers on the fast Gram path: ``Conv1D`` (a linear layer with its weight
stored transposed) and the position embedding on (1, T) position ids, against float64 loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon_agent.metrics import per_example_gram
from tests.agent.metrics.reference import loop_gram, rel_err


class _Positional(nn.Module):
    """Tokens plus a position embedding called on ``arange(T)[None]``: a batch of one."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(11, 6), nn.Embedding(5, 6), nn.Linear(6, 3)

    def forward(self, ids: Tensor) -> Tensor:
        where = torch.arange(ids.shape[1]).unsqueeze(0)  # (1, T)
        return self.head(torch.tanh(self.tok(ids) + self.pos(where)).mean(dim=1))


@pytest.mark.parametrize("t", [4, 5])  # 4: as many positions as examples in the probe
def test_a_position_embedding_on_a_batch_of_one_takes_the_fast_path(t: int) -> None:
    torch.manual_seed(0)
    model = _Positional().double()
    ids, y = torch.randint(0, 11, (4, t)), torch.randint(0, 3, (4,))
    got = per_example_gram(model, ids, y, nn.CrossEntropyLoss(), chunk_size=2)
    assert got.methods["pos"] != "loop" and got.methods["tok"] != "loop", got.methods
    assert rel_err(got.total, loop_gram(model, ids, y, nn.CrossEntropyLoss())) < 1e-10


def _tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=16, vocab_size=23, n_positions=12, bos_token_id=0,
        eos_token_id=0, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).double()


def _padded_batch() -> tuple[dict[str, Tensor], Tensor]:
    ids = torch.randint(0, 23, (6, 9))
    mask = torch.ones_like(ids)
    for i in range(6):  # right padding, 0 to 5 positions
        mask[i, 9 - i :] = 0
    return {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100)


def _forward(m: nn.Module, b: dict[str, Tensor]) -> Tensor:
    return m(**b).logits[:, :-1]  # position t predicts token t + 1


def _per_token(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none")


def test_gpt2_conv1d_and_position_layers_take_the_fast_path_and_match_a_float64_loop() -> None:
    model = _tiny_gpt2()
    batch, labels = _padded_batch()
    shifted = labels[:, 1:]  # lined up with the logits of positions 0 … T − 2

    def mean_loss(out: Tensor, y: Tensor) -> Tensor:  # one example: its mean over counted tokens
        return F.cross_entropy(out.transpose(1, 2), y)

    got = per_example_gram(model, batch, shifted, _per_token, forward=_forward, chunk_size=4)
    conv1d = [name for name in got.methods if name.endswith(("c_attn", "c_proj", "c_fc"))]
    assert len(conv1d) == 8
    fast = {name: got.methods[name] for name in [*conv1d, "transformer.wpe"]}
    assert "loop" not in fast.values(), got.methods
    assert got.methods["transformer.wte"] == "materialise"  # tied to lm_head: both uses summed
    want = loop_gram(model, batch, shifted, mean_loss, _forward)
    assert rel_err(got.total, want) < 1e-9


def test_per_token_losses_not_lined_up_with_padded_targets_are_refused() -> None:
    """A loss that shifts the labels itself returns T − 1 losses for T targets: which of them
    each example's mean leaves out cannot be told, and counting the padding as zero losses
    shrank every padded example's loss (the Gram off by 86 % here)."""
    model = _tiny_gpt2()
    batch, labels = _padded_batch()

    def shifting(out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out.transpose(1, 2), y[:, 1:], reduction="none")

    with pytest.raises(ValueError, match=r"do not line up with the targets .* labels\[:, 1:\]"):
        per_example_gram(model, batch, labels, shifting, forward=_forward)
    unpadded = batch["input_ids"]  # nothing ignored: every position counts, the mean is right
    per_example_gram(model, {"input_ids": unpadded}, unpadded, shifting, forward=_forward)
