"""Per-example Gram of attention layers against a float64 loop of single-example backward passes.

``nn.MultiheadAttention`` takes the hook path through its re-expressed forward
(:mod:`stiffmon_agent.metrics.gram.attention`); custom attention built from ``nn.Linear`` and
``scaled_dot_product_attention`` takes the Linear rule. Every measurement leaves the parameters
bit-identical and the module's forward as it was.
"""

from __future__ import annotations

import importlib.util
import itertools
from functools import partial
from pathlib import Path
from types import MethodType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon_agent.metrics import per_example_gram
from stiffmon_agent.metrics.gram.attention import MultiheadAttentionRule
from tests.agent.metrics.reference import loop_gram, rel_err

CE = nn.CrossEntropyLoss()
ROOT = Path(__file__).resolve().parents[3]
FAST = ("ghost", "materialise")
N, T, S, E, V = 6, 5, 4, 8, 11


class AttnNet(nn.Module):
    """Embeddings → one MultiheadAttention (self- or cross-attention, masks) → linear head.

    ``inputs``: "self" (query, key, value the same tensor), "kv" (a memory as key and value) or
    "qkv" (three different tensors). Padding masks come from the tokens (token 0), so they differ
    between examples.
    """

    def __init__(
        self,
        inputs: str = "self",
        batch_first: bool = True,
        kdim: int | None = None,
        padding: str | None = None,
        mask: str | None = None,
        need_weights: bool = False,
        **mha: Any,
    ) -> None:
        super().__init__()
        self.inputs, self.batch_first, self.padding, self.mask = inputs, batch_first, padding, mask
        self.need_weights = need_weights
        self.emb = nn.Embedding(V, E)
        self.mem = nn.Embedding(V, kdim or E)
        self.attn = nn.MultiheadAttention(
            E, 2, kdim=kdim, vdim=kdim, batch_first=batch_first, **mha
        )
        self.head = nn.Linear(E, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.emb(tokens)
        if self.inputs == "self":
            k = v = x
        else:
            k = self.mem(tokens[:, :S].flip(1))
            v = k if self.inputs == "kv" else torch.tanh(self.mem(tokens[:, 1 : S + 1]))
        src = k.shape[1]
        kpm: Tensor | None = None
        if self.padding is not None:
            kpm = tokens[:, :src] == 0
            kpm[:, 0] = False  # never a fully masked row
            if self.padding == "float":
                kpm = kpm.to(x.dtype) * -3.0
        mask: Tensor | None = None
        causal = self.mask == "causal"
        if causal:
            mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=x.dtype)
        elif self.mask == "2d":
            mask = torch.linspace(-1, 1, T * src, dtype=x.dtype).reshape(T, src)
        elif self.mask == "3d":  # per example and per head, from the tokens: (n·heads, T, S)
            d = (tokens[:, :, None] - tokens[:, None, :src]).to(x.dtype).cos()
            scale = torch.tensor([1.0, -0.5], dtype=x.dtype).view(1, 2, 1, 1)
            mask = (d.unsqueeze(1) * scale).reshape(-1, T, src)
        if not self.batch_first:
            x, k, v = x.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
            if self.inputs == "self":
                k = v = x
            elif self.inputs == "kv":
                v = k
        out, w = self.attn(
            x,
            k,
            v,
            key_padding_mask=kpm,
            attn_mask=mask,
            need_weights=self.need_weights,
            is_causal=causal,
        )
        if not self.batch_first:
            out = out.transpose(0, 1)
        logits = self.head(torch.tanh(out).mean(dim=1))
        if w is not None:  # the weights reach the loss too
            logits = logits + w[..., 0].reshape(tokens.shape[0], -1).sum(dim=1, keepdim=True)
        return logits


VARIANTS: dict[str, dict[str, Any]] = {
    "self": {},
    "self-seq-first": {"batch_first": False},
    "self-no-bias": {"bias": False},
    "kv-cross": {"inputs": "kv"},
    "qkv-cross-seq-first": {"inputs": "qkv", "batch_first": False},
    "kdim-vdim": {"inputs": "qkv", "kdim": 6},
    "kdim-kv-no-bias": {"inputs": "kv", "kdim": 5, "bias": False},
    "bool-padding": {"padding": "bool"},
    "float-padding-2d-mask": {"padding": "float", "mask": "2d", "inputs": "kv"},
    "3d-mask-seq-first": {"mask": "3d", "batch_first": False},
    "causal": {"mask": "causal"},
    "causal-padding-weights": {"mask": "causal", "padding": "bool", "need_weights": True},
    "weights-per-head": {"need_weights": True, "average_attn_weights": False},
    "bias-kv": {"add_bias_kv": True, "padding": "bool"},
    "zero-attn": {"add_zero_attn": True, "mask": "2d", "inputs": "kv"},
    "bias-kv-zero-attn-seq-first": {
        "add_bias_kv": True,
        "add_zero_attn": True,
        "batch_first": False,
        "padding": "float",
    },
}


def _make(variant: dict[str, Any]) -> nn.Module:
    kw = dict(variant)
    average = kw.pop("average_attn_weights", True)
    torch.manual_seed(0)
    model = AttnNet(**kw).double()
    if not average:  # an argument of the call, not of the module
        model.attn = _CallWith(model.attn, average_attn_weights=False)
    return model


class _CallWith(nn.Module):
    """Calls a module with extra keyword arguments (so that the call site passes them)."""

    def __init__(self, inner: nn.Module, **extra: Any) -> None:
        super().__init__()
        self.inner, self.extra = inner, extra

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs, **self.extra)


def _tokens(n: int = N, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (n, T), generator=g)
    tokens[::2, -1] = 0  # padding in some examples
    return tokens, torch.randint(0, 3, (n,), generator=g)


def _check(model: nn.Module, x: Any, y: Tensor, key: str, method: str = "auto") -> None:
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref = loop_gram(model, x, y, CE)
    got = per_example_gram(model, x, y, CE, method=method, chunk_size=4)  # type: ignore[arg-type]
    assert rel_err(got.total, ref) < 1e-10, got.methods
    assert rel_err(sum(got.layers.values()), ref) < 1e-10  # type: ignore[arg-type]
    assert got.methods[key] in FAST and got.methods[f"{key}.out_proj"] in FAST, got.methods
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert all("forward" not in m.__dict__ for m in model.modules() if m is not model)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_multihead_attention_gram_matches_loop(name: str) -> None:
    model = _make(VARIANTS[name])
    x, y = _tokens()
    key = "attn.inner" if isinstance(model.attn, _CallWith) else "attn"
    _check(model, x, y, key)


@pytest.mark.parametrize("method", FAST)
def test_forced_methods(method: str) -> None:
    for name in ("self", "qkv-cross-seq-first", "kdim-vdim", "bias-kv"):
        model = _make(VARIANTS[name])
        _check(model, *_tokens(), "attn", method=method)


@pytest.mark.parametrize(("norm_first", "batch_first"), itertools.product([False, True], repeat=2))
def test_encoder_layer(norm_first: bool, batch_first: bool) -> None:
    torch.manual_seed(0)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(V, E)
            self.enc = nn.TransformerEncoderLayer(
                E, 2, 16, dropout=0.1, norm_first=norm_first, batch_first=batch_first
            )
            self.head = nn.Linear(E, 3)

        def forward(self, tokens: Tensor) -> Tensor:
            h = self.emb(tokens)
            pad = tokens == 0
            pad[:, 0] = False
            mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=h.dtype)
            if batch_first:
                h = self.enc(h, src_mask=mask, src_key_padding_mask=pad, is_causal=True)
            else:
                h = self.enc(h.transpose(0, 1), src_mask=mask, src_key_padding_mask=pad)
                h = h.transpose(0, 1)
            return self.head(h.mean(dim=1))

    model = Encoder().double()
    _check(model, *_tokens(8, seed=1), "enc.self_attn")


def test_demo_tiny_transformer() -> None:
    spec = importlib.util.spec_from_file_location(
        "tiny_transformer", ROOT / "demos/tiny_transformer.py"
    )
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    torch.manual_seed(0)
    model = demo.TextClassifier(d=16, heads=2, layers=2).double()
    x, y = demo.make_data(8, seed=0)
    for i in range(2):
        _check(model, x, y, f"encoder.layers.{i}.self_attn")
    got = per_example_gram(model, x, y, CE)  # positions: a shared Embedding call, expanded
    assert set(got.methods.values()) <= set(FAST), got.methods


class LinearAttention(nn.Module):
    """Attention from nn.Linear q/k/v/o and scaled_dot_product_attention (no nn.MHA)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))
        self.head = nn.Linear(E, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.emb(tokens)
        n = x.shape[0]

        def heads(t: Tensor) -> Tensor:
            return t.view(n, T, 2, E // 2).transpose(1, 2)

        a = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True
        )
        return self.head(self.o(a.transpose(1, 2).reshape(n, T, E)).mean(dim=1))


def test_custom_attention_from_linear_layers_takes_the_linear_rule() -> None:
    torch.manual_seed(0)
    model = LinearAttention().double()
    x, y = _tokens()
    got = per_example_gram(model, x, y, CE)
    assert set(got.methods.values()) <= {"ghost", "materialise"}, got.methods
    assert rel_err(got.total, loop_gram(model, x, y, CE)) < 1e-10


class _OwnForward(nn.MultiheadAttention):
    def forward(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        out, w = super().forward(*args, **kwargs)
        return out * 2.0, w


class _Unbatched(nn.Module):
    """Calls the attention once per example on unbatched (T, E) inputs."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.emb, self.attn, self.head = nn.Embedding(V, E), attn, nn.Linear(E, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        rows = [self.attn(h, h, h, need_weights=False)[0] for h in self.emb(tokens)]
        return self.head(torch.stack(rows).mean(dim=1))


def test_calls_it_cannot_take_fall_back_exactly() -> None:
    x, y = _tokens()
    torch.manual_seed(0)
    sub = AttnNet().double()
    sub.attn = _OwnForward(E, 2, batch_first=True).double()  # a subclass with its own forward
    unbatched = _Unbatched(nn.MultiheadAttention(E, 2)).double()
    wrapped = AttnNet().double()
    # someone else's instance-level forward (as accelerate's hooks install)
    wrapped.attn.forward = MethodType(nn.MultiheadAttention.forward, wrapped.attn)
    for model in (sub, unbatched, wrapped):
        got = per_example_gram(model, x, y, CE)
        assert got.methods["attn"] == "vmap", got.methods
        assert rel_err(got.total, loop_gram(model, x, y, CE)) < 1e-10
    assert "forward" in wrapped.attn.__dict__  # left in place


def test_reexpressed_forward_equals_the_modules_own() -> None:
    """The hook pass's forward gives the module's outputs and weights, for every option."""
    rule = MultiheadAttentionRule()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = 3
    for bf, bias, kv, zero, cross, need, avg in itertools.product(
        [True, False], [True, False], [False, True], [False, True], ["self", "kv", "qkv"],
        [True, False], [True, False],
    ):  # fmt: skip
        mod = nn.MultiheadAttention(
            E, 2, bias=bias, add_bias_kv=kv, add_zero_attn=zero, batch_first=bf
        ).double()
        mod.eval()

        def rnd(t: int, bf: bool = bf) -> Tensor:
            shape = (n, t, E) if bf else (t, n, E)
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        q = rnd(T)
        k = q if cross == "self" else rnd(S)
        v = k if cross != "qkv" else rnd(S)
        src = k.shape[1 if bf else 0]
        kpm = torch.zeros(n, src, dtype=torch.bool)
        kpm[0, -1] = True
        mask = torch.randn(T, src, generator=g, dtype=torch.float64)
        kwargs = {"key_padding_mask": kpm, "attn_mask": mask, "need_weights": need}
        kwargs["average_attn_weights"] = avg
        ref_out, ref_w = mod(q, k, v, **kwargs)
        failed: list[int] = []
        handle = rule.install(mod, n, lambda c, nodes: None, partial(failed.append, 1))
        out, w = mod(q, k, v, **kwargs)
        handle.remove()
        assert not failed and "forward" not in mod.__dict__
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
        assert (w is None) == (ref_w is None)
        if w is not None:
            torch.testing.assert_close(w, ref_w, rtol=1e-12, atol=1e-12)
