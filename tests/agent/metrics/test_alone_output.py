"""A packed-sequence tagger that pads to the batch's longest sequence (``pad_packed_sequence``
without ``total_length=``) cannot give per-example gradients: example i alone has len_i output
positions for its T targets. Before, the Gram's ``metric-error`` was torch's "Expected target size
[1, 2], got [1, 7]" alone; now it names the cause and ``total_length=``. With ``total_length``
the same tagger is measured, and its Tr K matches the float64 loop of the token-weighted
per-example losses (L_i = Σ_t c_it ℓ_it / c̄)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from stiffmon_agent.metrics.alone_output import alone_shape_hint
from tests.agent.recording import (
    EVERY_STEP,
    close_and_read,
    last_scalar,
    metric_errors,
    offline_agent,
    train_step,
)

V, C, T, N = 9, 3, 6, 8


class PackedTagger(nn.Module):
    def __init__(self, total_length: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 4, padding_idx=0)
        self.rnn = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, C)
        self.total_length = total_length

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        packed = pack_padded_sequence(
            self.emb(tokens), lengths, batch_first=True, enforce_sorted=False
        )
        out, _ = self.rnn(packed)
        total = tokens.shape[1] if self.total_length else None
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=total)
        return self.head(out)


def forward(model: nn.Module, x: tuple[Tensor, Tensor]) -> Tensor:
    return model(*x).transpose(1, 2)  # CrossEntropyLoss wants the classes in dim 1


def tagging_probe() -> tuple[tuple[Tensor, Tensor], Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([T, 2, 5, 3, 6, 4, 2, 5])
    mask = torch.arange(T)[None] < lengths[:, None]
    tokens = torch.randint(1, V, (N, T), generator=g) * mask
    tags = torch.randint(0, C, (N, T), generator=g).masked_fill(~mask, -100)
    return (tokens, lengths), tags


def measured(total_length: bool, tmp_path: Path) -> tuple[PackedTagger, list]:
    torch.manual_seed(0)
    model = PackedTagger(total_length).double()
    x, y = tagging_probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    rec = tmp_path / "run.stiff"
    settings = EVERY_STEP | {"sharpness_every": "never"}
    agent = offline_agent(model, loss_fn, opt, rec, probe=(x, y), forward=forward, **settings)
    train_step(agent, opt, loss_fn(forward(model, x), y))
    return model, close_and_read(agent, rec)


def test_padding_to_the_batch_longest_is_named_with_total_length(tmp_path: Path) -> None:
    _, msgs = measured(False, tmp_path)
    error = metric_errors(msgs)["gram"]
    assert "total_length" in error and "example 1 alone" in error, error


def test_padding_to_the_input_length_is_measured_and_matches_the_loop(tmp_path: Path) -> None:
    model, msgs = measured(True, tmp_path)
    assert "gram" not in metric_errors(msgs)
    (tokens, lengths), y = tagging_probe()
    assert alone_shape_hint(model, (tokens, lengths), forward) is None
    c_bar = (y != -100).sum() / N
    params = list(model.parameters())
    rows = []
    for i in range(N):
        out = forward(model, (tokens[i : i + 1], lengths[i : i + 1]))
        loss = F.cross_entropy(out, y[i : i + 1], reduction="sum") / c_bar
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    d = torch.stack(rows) - torch.stack(rows).mean(0)
    trace_k = float((d * d).sum() / N)
    assert abs(last_scalar(msgs, "noise/trace_k") - trace_k) < 1e-9 * trace_k
