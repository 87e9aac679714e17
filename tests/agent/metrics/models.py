"""Tiny float64 models covering every layer kind the Gram fast path and its fallback see."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


class TiedLinear(nn.Module):
    """One Linear applied twice, and a second Linear whose weight is tied to a third."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(5, 5)
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(5, 4)
        self.b.weight = self.a.weight
        self.unused = nn.Linear(5, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.shared(torch.tanh(self.shared(x))))
        return self.a(h) + self.b(h * h)


class TokenLM(nn.Module):
    """(B, T) token ids to (B, T, ``vocab``) logits, position t seeing the mean of the tokens up
    to t (embedding and linear layers only: the hook rules)."""

    def __init__(self, vocab: int = 7) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.emb(tokens)
        steps = torch.arange(1, tokens.shape[1] + 1, dtype=h.dtype)[None, :, None]
        return self.head(torch.tanh(self.mix(h.cumsum(dim=1) / steps)))


class MeanVar(nn.Module):
    """A regression head returning (mean, variance), for ``GaussianNLLLoss``."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.mu, self.var = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.tanh(self.body(x))
        return self.mu(h), nn.functional.softplus(self.var(h)) + 1e-3


class TinyTransformer(nn.Module):
    def __init__(self, batch_first: bool = True, tie: bool = False) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(11, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=batch_first)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 11 if tie else 3)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.emb(tokens)
        h = self.enc(h) if self.batch_first else self.enc(h.transpose(0, 1)).transpose(0, 1)
        out = self.head(self.norm(h).mean(dim=1))
        return out[:, :3]


class Recurrent(nn.Module):
    """Embedding → RNN / GRU / LSTM → Linear on the last hidden state."""

    def __init__(self, kind: str, batch_first: bool = True, max_norm: float | None = None) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(11, 6, max_norm=max_norm)
        self.rnn = getattr(nn, kind)(6, 5, batch_first=batch_first)
        self.head = nn.Linear(5, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.emb(tokens)
        out, _ = self.rnn(h if self.batch_first else h.transpose(0, 1))
        last = out[:, -1] if self.batch_first else out[-1]
        return self.head(last)


class MaxNormBag(nn.Module):
    """Embedding(max_norm) (renormalises rows in place) → mean → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4, max_norm=0.5)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.emb(tokens).mean(dim=1))


class DictModel(nn.Module):
    """Takes a dict batch with an integer and a float field."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.lin = nn.Linear(4 + 3, 3)

    def forward(self, ids: Tensor, feats: Tensor) -> Tensor:
        return self.lin(torch.cat([self.emb(ids).mean(1), feats], dim=1))


def make_cases() -> dict[str, tuple[nn.Module, Any, Tensor]]:
    """name -> (model, inputs, targets), float64, N = 10, three classes."""
    torch.manual_seed(0)  # parameter initialisation
    g = torch.Generator().manual_seed(0)
    n = 10
    y = torch.randint(0, 3, (n,), generator=g)
    cases: dict[str, tuple[nn.Module, Any, Tensor]] = {}

    def rnd(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    cases["mlp"] = (
        nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)),
        rnd(n, 6),
        y,
    )
    cases["cnn"] = (
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2),
            nn.Tanh(),
            nn.Conv2d(6, 4, 2, padding=1, padding_mode="reflect", bias=False),
            nn.Flatten(),
            nn.Linear(4 * 5 * 5, 3),
        ),
        rnd(n, 2, 8, 8),
        y,
    )
    cases["conv1d"] = (
        nn.Sequential(
            nn.Conv1d(3, 4, 3, padding="same", padding_mode="circular"),
            nn.ReLU(),
            nn.Conv1d(4, 4, 2, stride=2, groups=4),
            nn.Flatten(),
            nn.Linear(4 * 5, 3),
        ),
        rnd(n, 3, 10),
        y,
    )
    bn = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    )
    with torch.no_grad():
        bn[1].running_mean.copy_(rnd(3))
        bn[1].running_var.copy_(rnd(3).abs() + 0.5)
    cases["batchnorm"] = (bn, rnd(n, 1, 6, 6), y)
    cases["layernorm"] = (
        nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3)),
        rnd(n, 5),
        y,
    )
    tokens = torch.randint(0, 11, (n, 6), generator=g)
    cases["transformer"] = (TinyTransformer(), tokens, y)
    cases["transformer-seq-first"] = (TinyTransformer(batch_first=False), tokens, y)
    cases["tied-embedding"] = (TinyTransformer(tie=True), tokens, y)
    cases["shared-weights"] = (TiedLinear(), rnd(n, 5), y)
    frozen = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    frozen[0].requires_grad_(False)
    frozen[2].bias.requires_grad_(False)
    frozen[4].weight.requires_grad_(False)
    cases["frozen"] = (frozen, rnd(n, 4), y)
    seq = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))  # Linear over (N, T, d)
    cases["sequence-linear"] = (_MeanOverTime(seq), rnd(n, 7, 4), y)
    cases["gru"] = (Recurrent("GRU"), tokens, y)
    cases["lstm-seq-first"] = (Recurrent("LSTM", batch_first=False), tokens, y)
    cases["rnn-max-norm"] = (Recurrent("RNN", max_norm=0.7), tokens, y)
    cases["embedding-max-norm"] = (MaxNormBag(), tokens, y)
    for model, _, _ in cases.values():
        model.double()
    with torch.no_grad():  # rows well above max_norm, so that renormalisation really happens
        for name in ("rnn-max-norm", "embedding-max-norm"):
            cases[name][0].emb.weight.mul_(3.0)
    return cases


class _MeanOverTime(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x).mean(dim=1)


def dict_case() -> tuple[nn.Module, dict[str, Tensor], Tensor, Callable[[nn.Module, Any], Tensor]]:
    g = torch.Generator().manual_seed(1)
    n = 8
    inputs = {
        "ids": torch.randint(0, 7, (n, 5), generator=g),
        "feats": torch.randn(n, 3, generator=g, dtype=torch.float64),
    }
    y = torch.randint(0, 3, (n,), generator=g)
    return DictModel().double(), inputs, y, lambda m, b: m(b["ids"], b["feats"])


def well_fit_float32_mlp() -> tuple[nn.Module, Tensor, Tensor]:
    """A float32 ReLU MLP trained until its examples' losses are 1e-4 to 1e-6 (1 − p_y cancels:
    its float32 single-example gradients and Hessian-vector products are the least accurate of
    the tests' models); 20 of its training examples."""
    torch.manual_seed(1)
    x = torch.randn(64, 16)
    y = (x @ torch.randn(16, 3)).argmax(1)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(1500):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, x[:20], y[:20]
