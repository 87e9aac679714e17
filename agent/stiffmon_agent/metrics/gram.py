r"""Per-example gradient Gram matrix G[i, j] = g_i · g_j without materialising the N×P gradients.

g_i = ∇_θ L(x_i, y_i) is the gradient of example i's loss with respect to the trainable
parameters θ. G = Σ_l G_l splits into one block per layer l.

For ``nn.Linear`` and ``nn.Conv1d`` / ``nn.Conv2d`` (padding, stride, dilation, groups, any padding
mode) the layer's per-example weight gradient is ∇W_i = Σ_t b_i[t] a_i[t]ᵀ, where a_i[t] are the
layer's inputs at position t (tokens of a sequence; unfolded patches of a convolution; one
position for a plain Linear; every call of a layer used several times) and b_i[t] = ∂(Σ_k L_k) /
∂out_i[t] the output gradients, both taken from one forward and one backward pass of the batch.
Per layer it takes the cheaper of

* the *ghost* form ⟨∇W_i, ∇W_j⟩ = Σ_{t,s} (a_i[t]·a_j[s]) (b_i[t]·b_j[s]), which for T = 1 is
  (A Aᵀ) ∘ (B Bᵀ), costing ~N²T²(d_in + d_out), and
* *materialised* per-layer gradients ∇W_i (N × d_out d_in) and their Gram, costing
  ~N T d_in d_out + N² d_in d_out

(Bu et al. 2022, mixed ghost clipping). Biases add (Σ_t b_i[t])·(Σ_s b_j[s]).
``nn.Embedding`` uses the ghost form with a_i[t]·a_j[s] = [token_i[t] = token_j[s]];
``nn.LayerNorm`` and BatchNorm with running statistics (eval mode) materialise their small
per-example gradients Σ_t x̂_i[t] ∘ b_i[t] and Σ_t b_i[t] directly.

Parameters of any other module (MultiheadAttention's projections, GroupNorm, custom modules,
raw parameters), parameters shared between modules (weight tying) and layers inside modules that
are not batch-first get exact per-example gradients from ``torch.func.vmap(grad)`` restricted to
just those parameters. As a safety net against layers used with the batch in another dimension,
G[0, 0] is checked against a single-example backward pass; on a mismatch every parameter goes
through vmap. The measurement runs in eval mode and leaves the model as it was
(:func:`~stiffmon_agent.metrics.state.measurement_mode`).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_map

from stiffmon_agent.metrics.probe import (
    Batch,
    ForwardFn,
    ForwardModule,
    LossFn,
    batch_size,
    default_forward,
    per_example_losses,
    take,
    unreduced,
)
from stiffmon_agent.metrics.state import measurement_mode, trainable_parameters

Method = Literal["auto", "ghost", "materialise", "vmap"]
_LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
_GHOST_BLOCK_ELEMENTS = 1 << 24  # bound on r·N·T² for the blocked ghost contractions
_VERIFY_RTOL = 1e-3


@dataclass(frozen=True)
class GramResult:
    """Per-example gradient Gram matrix and its per-layer blocks.

    Attributes:
        total: G, shape (N, N), G[i, j] = g_i · g_j.
        layers: Per-layer blocks G_l keyed by module name (``"(root)"`` for the model's own
            parameters); they sum to ``total``.
        methods: How each block was computed: ``"ghost"``, ``"materialise"`` or ``"vmap"``.
    """

    total: Tensor
    layers: dict[str, Tensor] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)

    @property
    def norms(self) -> Tensor:
        """Per-example gradient norms ‖g_i‖ = sqrt(G[i, i])."""
        return self.total.diagonal().clamp_min(0).sqrt()


@dataclass
class _Block:
    """Accumulated per-example factors of one parameter of a hooked layer, over chunks.

    ``kind`` is ``"linear"`` (a: (n, g, T, d_in), b: (n, g, T, d_out)), ``"embedding"``
    (a: tokens (n, T), b: (n, T, d)) or ``"dense"`` (grads: (n, P) per-example gradients).
    """

    kind: str
    method: str = ""
    a: list[Tensor] = field(default_factory=list)
    b: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)


@dataclass
class _Layer:
    name: str
    module: nn.Module
    params: dict[str, nn.Parameter]  # trainable direct parameters: "weight" and/or "bias"
    blocks: dict[str, _Block] = field(default_factory=dict)


def _module_prefix(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else "(root)"


def _native(mod: nn.Module) -> bool:
    if isinstance(mod, _LINEAR_TYPES):
        return True
    if isinstance(mod, nn.Embedding):
        return mod.max_norm is None and not mod.scale_grad_by_freq
    if isinstance(mod, nn.LayerNorm):
        return True
    if isinstance(mod, _BatchNorm):
        return mod.track_running_stats and mod.running_mean is not None
    return False


def _plan(model: nn.Module, method: Method) -> dict[str, _Layer]:
    """Choose the modules whose parameters take the hook path."""
    if method == "vmap":
        return {}
    owners: dict[nn.Parameter, int] = defaultdict(int)
    for _, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            owners[p] += 1
    not_batch_first: set[str] = set()
    for mname, mod in model.named_modules():
        if getattr(mod, "batch_first", True) is False:
            prefix = f"{mname}." if mname else ""
            not_batch_first.update(n for n, _ in model.named_modules() if n.startswith(prefix))
    layers: dict[str, _Layer] = {}
    for mname, mod in model.named_modules():
        if not _native(mod) or mname in not_batch_first:
            continue
        direct = dict(mod.named_parameters(recurse=False))
        if any(owners[p] > 1 for p in direct.values()):
            continue  # shared with another module: vmap sums all of its uses exactly
        trainable = {k: p for k, p in direct.items() if p.requires_grad and k in ("weight", "bias")}
        if trainable and len(trainable) == sum(p.requires_grad for p in direct.values()):
            layers[mname] = _Layer(mname, mod, trainable)
    return layers


# ----------------------------------------------------------------------------- per-call factors


def _linear_factors(mod: nn.Linear, x: Tensor, gy: Tensor, n: int) -> tuple[Tensor, Tensor]:
    return x.reshape(n, 1, -1, mod.in_features), gy.reshape(n, 1, -1, mod.out_features)


def _conv_factors(
    mod: nn.Conv1d | nn.Conv2d, x: Tensor, gy: Tensor, n: int
) -> tuple[Tensor, Tensor]:
    pad = tuple(mod._reversed_padding_repeated_twice)  # padding of the last dims, as F.pad wants
    if any(pad):
        mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
        x = F.pad(x, pad, mode=mode)
    if isinstance(mod, nn.Conv1d):  # as a Conv2d of height 1
        x, gy = x.unsqueeze(2), gy.unsqueeze(2)
        kernel, stride = (1, mod.kernel_size[0]), (1, mod.stride[0])
        dilation = (1, mod.dilation[0])
    else:
        kernel, stride, dilation = mod.kernel_size, mod.stride, mod.dilation
    cols = F.unfold(x, kernel_size=kernel, dilation=dilation, stride=stride)  # (n, C_in·k, L)
    g = mod.groups
    a = cols.reshape(n, g, -1, cols.shape[-1]).transpose(2, 3)  # (n, g, L, C_in/g·k)
    b = gy.reshape(n, g, mod.out_channels // g, -1).transpose(2, 3)  # (n, g, L, C_out/g)
    return a, b


def _call_factors(
    mod: nn.Module, x: Tensor, gy: Tensor, n: int
) -> dict[str, tuple[str, Tensor, Tensor | None]]:
    """Factors of one call: ``{param: (kind, a, b)}``, b None for dense per-example grads a."""
    if isinstance(mod, _LINEAR_TYPES):
        if isinstance(mod, nn.Linear):
            a, b = _linear_factors(mod, x, gy, n)
        else:
            a, b = _conv_factors(mod, x, gy, n)
        return {"weight": ("linear", a, b), "bias": ("dense", b.sum(dim=2).reshape(n, -1), None)}
    if isinstance(mod, nn.Embedding):
        tokens = x.reshape(n, -1)
        b = gy.reshape(n, tokens.shape[1], -1)
        if mod.padding_idx is not None:
            b = b * (tokens != mod.padding_idx).unsqueeze(-1).to(b.dtype)
        return {"weight": ("embedding", tokens, b)}
    if isinstance(mod, nn.LayerNorm):
        d = math.prod(mod.normalized_shape)
        xhat = F.layer_norm(x, mod.normalized_shape, None, None, mod.eps).reshape(n, -1, d)
        b = gy.reshape(n, -1, d)
    else:  # BatchNorm in eval mode: running statistics, channels in dim 1
        assert isinstance(mod, _BatchNorm) and mod.running_mean is not None
        c = x.shape[1]
        shape = (1, c) + (1,) * (x.dim() - 2)
        xhat = (x - mod.running_mean.view(shape)) / torch.sqrt(
            mod.running_var.view(shape) + mod.eps
        )
        xhat = xhat.reshape(n, c, -1).transpose(1, 2)
        b = gy.reshape(n, c, -1).transpose(1, 2)
    return {
        "weight": ("dense", (xhat * b).sum(dim=1), None),
        "bias": ("dense", b.sum(dim=1), None),
    }


def _valid_call(mod: nn.Module, x: Any, out: Any, n: int) -> bool:
    if not isinstance(x, Tensor) or not isinstance(out, Tensor) or x.dim() == 0:
        return False
    if x.shape[0] != n or out.shape[0] != n:
        return False
    if isinstance(mod, nn.Linear):
        return x.shape[-1] == mod.in_features
    if isinstance(mod, nn.Embedding):
        return not x.is_floating_point()
    if isinstance(mod, _BatchNorm):
        return x.dim() >= 2 and x.shape[1] == mod.num_features
    return True


# ----------------------------------------------------------------------------- Gram contractions


def _ghost_cost(n: int, t: int, d_in: int, d_out: int) -> tuple[float, float]:
    ghost = float(n) * n * t * t * (d_in + d_out + 1)
    materialise = float(n) * t * d_in * d_out + float(n) * n * d_in * d_out
    return ghost, materialise


def _ghost_gram(a: Tensor, b: Tensor) -> Tensor:
    """Σ_g Σ_{t,s} (a_i[t]·a_j[s]) (b_i[t]·b_j[s]) for a (N, g, T, d_in), b (N, g, T, d_out)."""
    n, groups, t, _ = a.shape
    if t == 1:
        a1, b1 = a[:, :, 0], b[:, :, 0]
        if groups == 1:
            return (a1[:, 0] @ a1[:, 0].T) * (b1[:, 0] @ b1[:, 0].T)
        return torch.einsum("igd,jgd,ige,jge->ij", a1, a1, b1, b1)
    out = a.new_zeros(n, n)
    rows = max(1, _GHOST_BLOCK_ELEMENTS // max(1, n * t * t))
    for g in range(groups):
        ag, bg = a[:, g], b[:, g]
        for start in range(0, n, rows):
            aa = torch.einsum("itd,jsd->ijts", ag[start : start + rows], ag)
            bb = torch.einsum("itd,jsd->ijts", bg[start : start + rows], bg)
            out[start : start + rows] += (aa * bb).sum(dim=(2, 3))
    return out


def _embedding_gram(tokens: Tensor, b: Tensor) -> Tensor:
    """Gram of embedding gradients, ∇E_i = Σ_t e_{tok_i[t]} b_i[t]ᵀ, from their sparse rows.

    Each example's gradient has one row per distinct token v, r_i[v] = Σ_{t: tok_i[t] = v} b_i[t],
    and G[i, j] = Σ_v r_i[v] · r_j[v] runs over the pairs of rows that share a token: about
    d Σ_v c_v² multiply-adds for c_v examples holding token v, instead of N²T²d for the ghost
    form or N²Vd for dense gradients.
    """
    n, t = tokens.shape
    d = b.shape[-1]
    ex = torch.arange(n, device=tokens.device).repeat_interleave(t)
    tok = tokens.reshape(-1).to(torch.int64)
    key = tok * n + ex  # sorted keys group rows by token, then by example
    uniq, inverse = torch.unique(key, return_inverse=True)
    rows = b.new_zeros(uniq.shape[0], d).index_add_(0, inverse, b.reshape(-1, d))
    row_tok, row_ex = uniq // n, uniq % n
    _, counts = torch.unique_consecutive(row_tok, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    group = torch.repeat_interleave(torch.arange(counts.shape[0], device=tokens.device), counts)
    per_row = counts[group]  # partners of each row: every row with the same token
    out = b.new_zeros(n, n)
    budget = max(1, _GHOST_BLOCK_ELEMENTS // max(1, d))
    r, total_rows = 0, rows.shape[0]
    while r < total_rows:  # chunk over rows so the pair buffer stays bounded
        cum = torch.cumsum(per_row[r:], 0)
        stop = r + max(1, int(torch.searchsorted(cum, torch.tensor(budget, device=cum.device))))
        stop = min(stop, total_rows)
        left = torch.repeat_interleave(torch.arange(r, stop, device=tokens.device), per_row[r:stop])
        offs = torch.arange(left.shape[0], device=tokens.device) - torch.repeat_interleave(
            torch.cumsum(per_row[r:stop], 0) - per_row[r:stop], per_row[r:stop]
        )
        right = starts[group[left]] + offs
        dots = (rows[left] * rows[right]).sum(dim=1)
        out.index_put_((row_ex[left], row_ex[right]), dots, accumulate=True)
        r = stop
    return out


def _materialise(a: Tensor, b: Tensor) -> Tensor:
    """Per-example weight gradients Σ_t b_i[t] a_i[t]ᵀ, flattened to (n, g·d_out·d_in)."""
    return torch.matmul(b.transpose(-1, -2), a).reshape(a.shape[0], -1)


def _cat(parts: list[Tensor], dim: int = 0) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _block_gram(block: _Block) -> Tensor:
    if block.kind == "dense" or block.method == "materialise":
        m = _cat(block.grads)
        return m @ m.T
    a, b = _cat(block.a), _cat(block.b)
    return _embedding_gram(a, b) if block.kind == "embedding" else _ghost_gram(a, b)


# ----------------------------------------------------------------------------- passes


def _hook_pass(
    model: nn.Module,
    layers: dict[str, _Layer],
    chunk_inputs: Batch,
    chunk_targets: Batch,
    forward: ForwardFn,
    loss_fn: LossFn,
    n: int,
    method: Method,
) -> set[str]:
    """One forward and backward pass of a chunk; add every hooked layer's factors.

    Returns the layers that cannot take the hook path (called with another batch layout, or never
    called: their parameters may be used functionally); their factors are not added.
    """
    calls: dict[str, list[tuple[Tensor, Tensor]]] = defaultdict(list)
    failed: set[str] = set()

    def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], Any]:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
            x = args[0] if args else None
            if name in failed or not _valid_call(mod, x, out, n):
                failed.add(name)
                return None
            calls[name].append((x.detach(), out))  # type: ignore[union-attr]
            # the network continues on a copy: in-place ops after the layer (ReLU(inplace=True))
            # must not turn `out` into a different node of the graph
            return out.clone()

        return hook

    handles = [
        layer.module.register_forward_hook(make_hook(name)) for name, layer in layers.items()
    ]
    try:
        outputs = forward(model, chunk_inputs)
    finally:
        for h in handles:
            h.remove()
    failed |= {name for name in layers if name not in calls}
    loss = per_example_losses(loss_fn, outputs, chunk_targets, n).sum()
    flat = [(name, x, out) for name, cs in calls.items() if name not in failed for x, out in cs]
    gouts = torch.autograd.grad(loss, [o for _, _, o in flat], allow_unused=True) if flat else ()
    merged: dict[str, dict[str, list[tuple[str, Tensor, Tensor | None]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    with torch.no_grad():
        for (name, x, out), gy in zip(flat, gouts, strict=True):
            gy = torch.zeros_like(out) if gy is None else gy
            for pname, fac in _call_factors(layers[name].module, x, gy, n).items():
                if pname in layers[name].params:
                    merged[name][pname].append(fac)
        for name, per_param in merged.items():
            layer = layers[name]
            for pname, facs in per_param.items():
                kind = facs[0][0]
                block = layer.blocks.setdefault(pname, _Block(kind))
                if kind == "dense":
                    block.grads.append(
                        facs[0][1] if len(facs) == 1 else torch.stack([f[1] for f in facs]).sum(0)
                    )
                    continue
                a = _cat([f[1] for f in facs], dim=2 if kind == "linear" else 1)
                b = _cat([f[2] for f in facs], dim=2 if kind == "linear" else 1)  # type: ignore[misc]
                if not block.method:
                    block.method = _choose(kind, a, b, n, method)
                if block.method == "materialise":
                    block.grads.append(_materialise(a, b))
                else:
                    block.a.append(a)
                    block.b.append(b)
    return failed


def _choose(kind: str, a: Tensor, b: Tensor, n: int, method: Method) -> str:
    if kind == "embedding":
        return "ghost"
    if method in ("ghost", "materialise"):
        return method
    ghost, mat = _ghost_cost(n, a.shape[2], a.shape[3], b.shape[3])
    return "ghost" if ghost <= mat else "materialise"


def _vmap_grads(
    model: nn.Module,
    names: list[str],
    chunk_inputs: Batch,
    chunk_targets: Batch,
    forward: ForwardFn,
    loss_fn: LossFn,
) -> dict[str, Tensor]:
    """Exact per-example gradients of the parameters ``names`` via ``vmap(grad)``.

    Tied parameters stay tied (``functional_call(tie_weights=True)``), so the gradient of a
    shared parameter sums all of its uses.
    """
    wrapper = ForwardModule(model, forward)
    params = dict(model.named_parameters())
    chosen = {f"model.{k}": params[k].detach() for k in names}

    def example_loss(p: dict[str, Tensor], x: Batch, y: Batch) -> Tensor:
        x1 = tree_map(lambda t: t.unsqueeze(0), x)
        y1 = tree_map(lambda t: t.unsqueeze(0), y)
        out = functional_call(wrapper, p, (x1,), strict=False, tie_weights=True)
        return per_example_losses(loss_fn, out, y1, 1)[0]

    with warnings.catch_warnings():
        # torch warns that some ops (CPU flash attention) have no batching rule yet: still exact
        warnings.filterwarnings("ignore", message="There is a performance drop")
        grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(chosen, chunk_inputs, chunk_targets)
    return {k: grads[f"model.{k}"] for k in names}


def _single_example_sq_norm(
    model: nn.Module,
    params: list[nn.Parameter],
    x: Batch,
    y: Batch,
    forward: ForwardFn,
    loss_fn: LossFn,
) -> float:
    loss = per_example_losses(loss_fn, forward(model, x), y, 1)[0]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return float(sum(float((g.double() ** 2).sum()) for g in grads if g is not None))


def per_example_gram(
    model: nn.Module,
    inputs: Batch,
    targets: Batch,
    loss_fn: LossFn,
    *,
    forward: ForwardFn | None = None,
    chunk_size: int | None = 128,
    method: Method = "auto",
    verify: bool = True,
) -> GramResult:
    r"""Gram matrix G[i, j] = g_i · g_j of per-example gradients, with per-layer blocks.

    Args:
        model: The network. Only parameters with ``requires_grad`` count (frozen ones are
            excluded). Measured in eval mode; mode, buffers, ``.grad`` and RNG state are restored.
        inputs: Probe inputs (tensor or tuple/list/dict of tensors), examples along dim 0.
        targets: Probe targets, examples along dim 0.
        loss_fn: ``loss_fn(outputs, targets)``; a ``torch.nn`` loss module (its reduction is
            switched to ``"none"`` on a copy) or a callable returning per-example losses.
        forward: ``forward(model, inputs) -> outputs``; default ``model(inputs)``.
        chunk_size: Examples per forward/backward pass (bounds activation memory); None: all.
        method: ``"auto"`` picks ghost or materialised per layer; ``"ghost"`` /
            ``"materialise"`` force one for every linear/conv layer; ``"vmap"`` uses
            ``torch.func.vmap(grad)`` for every parameter (the slow baseline).
        verify: Check G[0, 0] against a single-example backward pass (relative 1e-3) and redo
            everything with vmap on a mismatch, with a warning.

    Returns:
        G and its per-layer blocks; G's dtype and device are those of the parameters.

    Raises:
        ValueError: If the model has no trainable parameter or the probe is malformed.
    """
    forward = forward or default_forward
    loss_fn = unreduced(loss_fn)
    n_total = batch_size(inputs)
    if batch_size(targets) != n_total:
        raise ValueError("inputs and targets have different numbers of examples")
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    chunk = n_total if not chunk_size else max(1, min(chunk_size, n_total))
    with measurement_mode(model):
        result = _gram(
            model,
            params,
            _plan(model, method),
            inputs,
            targets,
            forward,
            loss_fn,
            n_total,
            chunk,
            method,
        )
        if verify and method != "vmap" and any(m != "vmap" for m in result.methods.values()):
            one = take(inputs, slice(0, 1)), take(targets, slice(0, 1))
            ref = _single_example_sq_norm(model, list(params.values()), *one, forward, loss_fn)
            got = float(result.total[0, 0])
            if math.isfinite(ref) and abs(got - ref) > _VERIFY_RTOL * max(abs(ref), 1e-30):
                warnings.warn(
                    f"stiffmon: per-example Gram fast path disagrees with a single-example "
                    f"backward pass (G[0,0] = {got:.6g} vs {ref:.6g}); some layer does not take "
                    "examples along dim 0 or the model couples examples. Using vmap(grad).",
                    RuntimeWarning,
                    stacklevel=2,
                )
                result = _gram(
                    model, params, {}, inputs, targets, forward, loss_fn, n_total, chunk, "vmap"
                )
        return result


def _gram(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    layers: dict[str, _Layer],
    inputs: Batch,
    targets: Batch,
    forward: ForwardFn,
    loss_fn: LossFn,
    n_total: int,
    chunk: int,
    method: Method,
) -> GramResult:
    fallback: list[str] | None = None
    vmap_parts: dict[str, list[Tensor]] = defaultdict(list)
    for start in range(0, n_total, chunk):
        idx = slice(start, min(start + chunk, n_total))
        x, y = take(inputs, idx), take(targets, idx)
        n = min(start + chunk, n_total) - start
        if layers:
            failed = _hook_pass(model, layers, x, y, forward, loss_fn, n, method)
            if failed and fallback is not None:  # a layer changed behaviour between chunks
                for name in failed:
                    layers.pop(name, None)
                return _gram(
                    model,
                    params,
                    {k: _Layer(k, v.module, v.params) for k, v in layers.items()},
                    inputs,
                    targets,
                    forward,
                    loss_fn,
                    n_total,
                    chunk,
                    method,
                )
            for name in failed:
                layers.pop(name, None)
        if fallback is None:
            hooked = {id(p) for layer in layers.values() for p in layer.params.values()}
            fallback = [name for name, p in params.items() if id(p) not in hooked]
        if fallback:
            for name, g in _vmap_grads(model, fallback, x, y, forward, loss_fn).items():
                vmap_parts[name].append(g.detach().reshape(n, -1))

    blocks: dict[str, Tensor] = {}
    methods: dict[str, str] = {}
    for name, layer in layers.items():
        parts = [_block_gram(b) for b in layer.blocks.values()]
        blocks[name] = torch.stack(parts).sum(0)
        w = layer.blocks.get("weight")
        methods[name] = w.method if w is not None and w.method else "materialise"
    for pname in fallback or []:
        key = _module_prefix(pname)
        m = _cat(vmap_parts[pname])
        blocks[key] = blocks[key] + m @ m.T if key in blocks else m @ m.T
        methods[key] = "vmap"
    total = torch.stack(list(blocks.values())).sum(0)
    return GramResult(total=total, layers=blocks, methods=methods)


def per_example_gradients(
    model: nn.Module,
    inputs: Batch,
    targets: Batch,
    loss_fn: LossFn,
    *,
    forward: ForwardFn | None = None,
) -> Tensor:
    """The N×P matrix of flattened per-example gradients via ``vmap(grad)`` (small models only).

    Used by the gradient-noise helpers that need explicit gradients, and as a baseline.
    """
    forward = forward or default_forward
    loss_fn = unreduced(loss_fn)
    names = list(trainable_parameters(model))
    with measurement_mode(model):
        grads = _vmap_grads(model, names, inputs, targets, forward, loss_fn)
    n = batch_size(inputs)
    return torch.cat([grads[k].reshape(n, -1) for k in names], dim=1)


def gram_flops_estimate(n: int, t: int, d_in: int, d_out: int) -> dict[str, float]:
    """FLOP estimates of the two per-layer forms (used to choose; exposed for benchmarks)."""
    ghost, mat = _ghost_cost(n, t, d_in, d_out)
    return {"ghost": ghost, "materialise": mat, "log10_ratio": math.log10(ghost / mat)}
