r"""``nn.MultiheadAttention``: its projections are Linear layers applied position-wise, so

* in-projection (fused ``in_proj_weight`` = [W_q; W_k; W_v], or ``q/k/v_proj_weight`` when
  ``kdim``/``vdim`` differ from ``embed_dim``): ∇W_q,i = Σ_t b^q_i[t] x^q_i[t]ᵀ over the target
  positions t, with x^q the query input and b^q the gradient of the summed per-example losses
  with respect to the projected queries, and the same for keys and values over the source
  positions; ∇b_i = Σ_t b_i[t] for the biases;
* out-projection: ∇W_o,i = Σ_t b^o_i[t] c_i[t]ᵀ, c the concatenated heads (the input of
  ``out_proj``) and b^o the gradient with respect to the layer's output;
* ``add_bias_kv``: ∇bias_k,i is the gradient with respect to the key row appended to example i.

The module computes its projections with functional calls on its parameters, so a forward hook
cannot see them. During the hook pass (only) the module's forward is re-expressed through its
parts: the same projections, masks (``attn_mask`` 2-D or 3-D, ``key_padding_mask``, bool or
float, ``is_causal``), ``bias_k``/``bias_v``, ``add_zero_attn``, ``need_weights`` and
``average_attn_weights``, and ``scaled_dot_product_attention`` (or the explicit softmax when the
weights are returned), as ``torch.nn.functional.multi_head_attention_forward`` does; the
projected tensors are the recorded graph nodes. Training never runs this code, and the safety
net (:mod:`.verify`) compares the result with single-example backward passes through the
module's own forward. Calls it does not take (unbatched inputs, dropout in training mode, a
subclass with its own ``forward``, shapes that do not show the probe's examples in the batch
dimension of the module's layout) run the module's own forward and the layer takes the fallbacks.

A self-attention call (query, key and value the same tensor) has one factor pair for the fused
weight, (x, b^{qkv}) with b^{qkv} of width 3E. Otherwise the positions of the distinct inputs are
concatenated, each with its gradient in its rows' columns of the fused weight and zeros elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon_agent.metrics.gram.linear import linear_factors
from stiffmon_agent.metrics.gram.rules import Factors, Handle, Record, register


@dataclass(frozen=True)
class _Context:
    """Detached inputs of one call, batch-first: projection inputs by site and the heads."""

    inputs: dict[str, Tensor]  # "qkv" (self-attention) or "q", "k", "v": (n, T, d)
    sites: dict[str, str]  # which input feeds each projection: {"q": "q", "k": "k", "v": "k"}
    heads: Tensor  # (n, L, E), the input of out_proj


class _Restore:
    """Handle that removes the re-expressed forward (an instance attribute during the pass)."""

    def __init__(self, mod: nn.Module, forward: Any, patched: bool = True) -> None:
        self.mod, self.forward, self.patched = mod, forward, patched

    def remove(self) -> None:
        if self.patched and self.mod.__dict__.get("forward") is self.forward:
            del self.mod.forward
        self.patched = False


@register(nn.MultiheadAttention)
class MultiheadAttentionRule:
    """Per-example factors of every parameter of ``nn.MultiheadAttention`` (see module doc)."""

    def native(self, mod: nn.Module) -> bool:
        # a subclass with its own forward computes something this rule does not know
        return type(mod).forward is nn.MultiheadAttention.forward

    def parameters(self, mod: nn.Module) -> dict[str, nn.Parameter]:
        return dict(mod.named_parameters())

    def install(self, mod: nn.Module, n: int, record: Record, fail: Callable[[], None]) -> Handle:
        assert isinstance(mod, nn.MultiheadAttention)
        if "forward" in mod.__dict__:  # someone else's wrapper (accelerate hooks): keep it
            fail()
            return _Restore(mod, None, patched=False)
        own = nn.MultiheadAttention.forward.__get__(mod)

        def forward(query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
            kw = _bind(args, kwargs)
            if kw is None or not _supported(mod, query, key, value, n, kw):
                fail()
                return own(query, key, value, *args, **kwargs)
            return _forward(mod, query, key, value, record, **kw)

        mod.forward = forward  # type: ignore[method-assign]
        return _Restore(mod, forward)

    def call_factors(
        self, mod: nn.Module, context: Any, grads: dict[str, Tensor], n: int
    ) -> Factors:
        assert isinstance(mod, nn.MultiheadAttention) and isinstance(context, _Context)
        e = mod.embed_dim
        out: Factors = {}
        if "out" in grads:
            heads = context.heads.reshape(n, 1, -1, e)
            g_out = grads["out"].reshape(n, 1, -1, e)
            for k, v in linear_factors(heads, g_out, n).items():
                out[f"out_proj.{k}"] = v
        for name in ("bias_k", "bias_v"):
            if name in grads:
                out[name] = ("dense", grads[name].reshape(n, e), None)
        if "qkv" in grads:  # self-attention: one fused projection
            x = context.inputs["qkv"]
            g = grads["qkv"]
            out["in_proj_weight"] = ("linear", x.unsqueeze(1), g.unsqueeze(1))
            out["in_proj_bias"] = ("dense", g.sum(dim=1), None)
            return out
        if not all(s in grads for s in "qkv"):  # no in-projection parameter is trainable
            return out
        sums = [grads[s].sum(dim=1) for s in "qkv"]
        out["in_proj_bias"] = ("dense", torch.cat(sums, dim=1), None)
        if not mod._qkv_same_embed_dim:
            for s in "qkv":
                x = context.inputs[context.sites[s]]
                out[f"{s}_proj_weight"] = ("linear", x.unsqueeze(1), grads[s].unsqueeze(1))
            return out
        # fused weight, distinct inputs: positions of each input, gradients in its rows
        a_parts, b_parts = [], []
        for src in dict.fromkeys(context.sites.values()):
            x = context.inputs[src]
            cols = [
                grads[s] if context.sites[s] == src else x.new_zeros(n, x.shape[1], e)
                for s in "qkv"
            ]
            a_parts.append(x)
            b_parts.append(torch.cat(cols, dim=2))
        a = torch.cat(a_parts, dim=1).unsqueeze(1)
        b = torch.cat(b_parts, dim=1).unsqueeze(1)
        out["in_proj_weight"] = ("linear", a, b)
        return out


_DEFAULTS: dict[str, Any] = {
    "key_padding_mask": None,
    "need_weights": True,
    "attn_mask": None,
    "average_attn_weights": True,
    "is_causal": False,
}


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """``MultiheadAttention.forward``'s optional arguments by name (None if unknown ones)."""
    if len(args) > len(_DEFAULTS) or set(kwargs) - set(_DEFAULTS):
        return None
    bound = dict(_DEFAULTS)
    bound.update(zip(_DEFAULTS, args, strict=False))
    bound.update(kwargs)
    return bound


def _supported(
    mod: nn.MultiheadAttention, q: Any, k: Any, v: Any, n: int, kw: dict[str, Any]
) -> bool:
    """Batched 3-D inputs with the n examples in the batch dimension of the module's layout."""
    if not all(isinstance(t, Tensor) and t.dim() == 3 and not t.is_nested for t in (q, k, v)):
        return False
    bdim = 0 if mod.batch_first else 1
    if any(t.shape[bdim] != n for t in (q, k, v)) or (mod.training and mod.dropout > 0):
        return False
    if kw["is_causal"] and kw["attn_mask"] is None:
        return False  # the module's own forward raises its error
    for name in ("attn_mask", "key_padding_mask"):
        m = kw[name]
        if m is not None and m.dtype not in (torch.bool, q.dtype):
            return False  # the module's own forward converts or rejects it
    kpm, mask = kw["key_padding_mask"], kw["attn_mask"]
    s, length = k.shape[1 - bdim], q.shape[1 - bdim]
    if kpm is not None and tuple(kpm.shape) != (n, s):
        return False
    heads = (n * mod.num_heads, length, s)
    return mask is None or tuple(mask.shape) in ((length, s), heads)


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Boolean masks (True: not allowed to attend) as additive float masks (−∞)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)


def _forward(
    mod: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    record: Record,
    *,
    key_padding_mask: Tensor | None,
    need_weights: bool,
    attn_mask: Tensor | None,
    average_attn_weights: bool,
    is_causal: bool,
) -> tuple[Tensor, Tensor | None]:
    """The module's forward through its parts, recording projection inputs and outputs."""
    e, h = mod.embed_dim, mod.num_heads
    hd = e // h
    fused = query is key and key is value
    same_kv = key is value
    if not mod.batch_first:  # work batch-first: (n, T, d)
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    n, length, _ = query.shape
    dtype = query.dtype
    kpm = _float_mask(key_padding_mask, dtype)
    use_causal = is_causal and kpm is None and not need_weights
    mask = None if use_causal else _float_mask(attn_mask, dtype)

    inputs: dict[str, Tensor] = {}
    nodes: dict[str, Tensor] = {}
    if fused:
        proj = F.linear(query, mod.in_proj_weight, mod.in_proj_bias)
        q, k, v = proj.chunk(3, dim=-1)
        inputs["qkv"], nodes["qkv"] = query.detach(), proj
        sites = {"q": "qkv", "k": "qkv", "v": "qkv"}
    else:
        sites = {"q": "q", "k": "k", "v": "k" if same_kv else "v"}
        x = {"q": query, "k": key, "v": value}
        bias = (None,) * 3 if mod.in_proj_bias is None else mod.in_proj_bias.chunk(3)
        if mod._qkv_same_embed_dim:
            weights = mod.in_proj_weight.chunk(3)
        else:
            weights = (mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight)
        projected = []
        for s, w, b in zip("qkv", weights, bias, strict=True):
            projected.append(F.linear(x[s], w, b))
            inputs[sites[s]] = x[sites[s]].detach()
            nodes[s] = projected[-1]
        q, k, v = projected

    if mod.bias_k is not None and mod.bias_v is not None:
        bk, bv = mod.bias_k.repeat(n, 1, 1), mod.bias_v.repeat(n, 1, 1)  # (n, 1, E)
        nodes["bias_k"], nodes["bias_v"] = bk, bv
        k, v = torch.cat([k, bk], dim=1), torch.cat([v, bv], dim=1)
        mask = None if mask is None else F.pad(mask, (0, 1))
        kpm = None if kpm is None else F.pad(kpm, (0, 1))

    def split(t: Tensor) -> Tensor:  # (n, T, E) -> (n, h, T, hd)
        return t.reshape(n, t.shape[1], h, hd).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    if mod.add_zero_attn:
        zeros = torch.zeros(n, h, 1, hd, dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
        mask = None if mask is None else F.pad(mask, (0, 1))
        kpm = None if kpm is None else F.pad(kpm, (0, 1))
    src = k.shape[2]
    if mask is not None:  # (L, S) for every head, or (n·h, L, S)
        mask = mask.view(1, 1, length, src) if mask.dim() == 2 else mask.view(n, h, length, src)
    if kpm is not None:
        kpm = kpm.view(n, 1, 1, src)
        mask = kpm if mask is None else mask + kpm

    weights_out: Tensor | None = None
    if need_weights:
        scores = (q * math.sqrt(1.0 / hd)) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        attn = torch.softmax(scores, dim=-1)
        ctx = attn @ v
        weights_out = attn.mean(dim=1) if average_attn_weights else attn
    else:
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=use_causal)
    heads = ctx.transpose(1, 2).reshape(n, length, e)
    out = F.linear(heads, mod.out_proj.weight, mod.out_proj.bias)
    nodes["out"] = out
    keep = {
        k: v
        for k, v in nodes.items()
        if k in ("qkv", "q", "k", "v", "out", "bias_k", "bias_v") and v.requires_grad
    }
    record(_Context(inputs, sites, heads.detach()), keep)
    # the network continues on a copy, so that in-place ops after the layer leave `out` alone
    if mod.batch_first:
        return out.clone(), weights_out
    return out.transpose(0, 1).clone(memory_format=torch.contiguous_format), weights_out
