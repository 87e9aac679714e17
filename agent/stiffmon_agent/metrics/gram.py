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

Parameters of any other module (LayerNorm, Embedding, MultiheadAttention, custom modules),
parameters shared between modules (weight tying) and layers inside modules that are not
batch-first get exact per-example gradients from ``torch.func.vmap(grad)`` restricted to just
those parameters. The measurement runs in eval mode and leaves the model as it was
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
_HOOKED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
_GHOST_BLOCK_ELEMENTS = 1 << 24  # bound on r·N·T² for the blocked ghost contraction


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


class _Unsupported(Exception):
    """A hooked layer was used in a way the fast path cannot handle; it goes to vmap."""

    def __init__(self, module_name: str) -> None:
        super().__init__(module_name)
        self.module_name = module_name


@dataclass
class _Layer:
    """A hooked module and the factors gathered for it."""

    name: str
    module: nn.Module
    weight: bool
    bias: bool
    a: list[Tensor] = field(default_factory=list)  # per chunk: (n, g, T, d_in)
    b: list[Tensor] = field(default_factory=list)  # per chunk: (n, g, T, d_out)
    grads: list[Tensor] = field(default_factory=list)  # per chunk: (n, P_l) if materialised
    bias_sums: list[Tensor] = field(default_factory=list)  # per chunk: (n, C_out)
    method: str = ""


def _module_prefix(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else "(root)"


def _plan(model: nn.Module, method: Method, excluded: set[str]) -> dict[str, _Layer]:
    """Choose the modules whose parameters take the hook path."""
    if method == "vmap":
        return {}
    owners: dict[nn.Parameter, list[str]] = defaultdict(list)
    for mname, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            owners[p].append(mname)
    not_batch_first: set[str] = set()
    for mname, mod in model.named_modules():
        if getattr(mod, "batch_first", True) is False:
            prefix = f"{mname}." if mname else ""
            not_batch_first.update(n for n, _ in model.named_modules() if n.startswith(prefix))
    layers: dict[str, _Layer] = {}
    for mname, mod in model.named_modules():
        if type(mod) not in _HOOKED_TYPES and not isinstance(mod, _HOOKED_TYPES):
            continue
        if mname in excluded or mname in not_batch_first:
            continue
        w, b = mod.weight, mod.bias
        w_on = w is not None and w.requires_grad
        b_on = b is not None and b.requires_grad
        if not (w_on or b_on):
            continue
        if any(len(owners[p]) > 1 for p in (w, b) if p is not None and p.requires_grad):
            continue  # shared with another module: vmap sums all its uses exactly
        layers[mname] = _Layer(mname, mod, w_on, b_on)
    return layers


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
    if a.shape[2] != b.shape[2]:
        raise RuntimeError("unfold and output positions disagree")
    return a, b


def _ghost_cost(n: int, t: int, d_in: int, d_out: int) -> tuple[float, float]:
    ghost = float(n) * n * t * t * (d_in + d_out + 1)
    materialise = float(n) * t * d_in * d_out + float(n) * n * d_in * d_out
    return ghost, materialise


def _ghost_gram(a: Tensor, b: Tensor) -> Tensor:
    """Σ_g Σ_{t,s} (a_i[t]·a_j[s]) (b_i[t]·b_j[s]) for a (N, g, T, d_in), b (N, g, T, d_out)."""
    n, groups, t, _ = a.shape
    if t == 1:
        a1, b1 = a[:, :, 0], b[:, :, 0]
        return (
            torch.einsum("igd,jgd,ige,jge->ij", a1, a1, b1, b1)
            if groups > 1
            else ((a1[:, 0] @ a1[:, 0].T) * (b1[:, 0] @ b1[:, 0].T))
        )
    out = a.new_zeros(n, n)
    rows = max(1, _GHOST_BLOCK_ELEMENTS // max(1, n * t * t))
    for g in range(groups):
        ag, bg = a[:, g], b[:, g]
        for start in range(0, n, rows):
            aa = torch.einsum("itd,jsd->ijts", ag[start : start + rows], ag)
            bb = torch.einsum("itd,jsd->ijts", bg[start : start + rows], bg)
            out[start : start + rows] += (aa * bb).sum(dim=(2, 3))
    return out


def _materialise(a: Tensor, b: Tensor) -> Tensor:
    """Per-example weight gradients Σ_t b_i[t] a_i[t]ᵀ, flattened to (n, g·d_out·d_in)."""
    return torch.einsum("ngto,ngti->ngoi", b, a).reshape(a.shape[0], -1)


def _hook_pass(
    model: nn.Module,
    layers: dict[str, _Layer],
    chunk_inputs: Batch,
    chunk_targets: Batch,
    forward: ForwardFn,
    loss_fn: LossFn,
    n: int,
) -> None:
    """One forward and backward pass of a chunk; append the factors of every hooked layer."""
    calls: dict[str, list[tuple[Tensor, Tensor]]] = defaultdict(list)

    def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Tensor], Tensor]:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
            x = args[0] if args else None
            if (
                not isinstance(x, Tensor)
                or not isinstance(out, Tensor)
                or x.dim() == 0
                or x.shape[0] != n
                or out.shape[0] != n
            ):
                raise _Unsupported(name)
            calls[name].append((x.detach(), out))
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
    loss = per_example_losses(loss_fn, outputs, chunk_targets, n).sum()
    flat = [(name, x, tap) for name, cs in calls.items() for x, tap in cs]
    taps = [tap for _, _, tap in flat]
    gouts = torch.autograd.grad(loss, taps, allow_unused=True) if taps else ()
    per_layer: dict[str, list[tuple[Tensor, Tensor]]] = defaultdict(list)
    for (name, x, tap), gy in zip(flat, gouts, strict=True):
        gy = torch.zeros_like(tap) if gy is None else gy
        mod = layers[name].module
        if isinstance(mod, nn.Linear):
            if x.shape[-1] != mod.in_features:
                raise _Unsupported(name)
            per_layer[name].append(_linear_factors(mod, x, gy, n))
        else:
            per_layer[name].append(_conv_factors(mod, x, gy, n))  # type: ignore[arg-type]
    for name, layer in layers.items():
        facs = per_layer.get(name)
        if not facs:
            raise _Unsupported(name)  # never called: its parameters may be used functionally
        a = torch.cat([f[0] for f in facs], dim=2)
        b = torch.cat([f[1] for f in facs], dim=2)
        if layer.bias:
            layer.bias_sums.append(b.sum(dim=2).reshape(n, -1))
        if not layer.weight:
            continue
        if not layer.method:
            t, d_in = a.shape[2], a.shape[3]
            cost_g, cost_m = _ghost_cost(n, t, d_in, b.shape[-1])
            layer.method = "ghost" if cost_g <= cost_m else "materialise"
        if layer.method == "ghost":
            layer.a.append(a)
            layer.b.append(b)
        else:
            layer.grads.append(_materialise(a, b))


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


def per_example_gram(
    model: nn.Module,
    inputs: Batch,
    targets: Batch,
    loss_fn: LossFn,
    *,
    forward: ForwardFn | None = None,
    chunk_size: int | None = 128,
    method: Method = "auto",
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
            ``"materialise"`` force one for every hooked layer; ``"vmap"`` uses
            ``torch.func.vmap(grad)`` for every parameter (the slow baseline).

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
    excluded: set[str] = set()
    with measurement_mode(model):
        while True:
            layers = _plan(model, method, excluded)
            try:
                return _gram(
                    model, params, layers, inputs, targets, forward, loss_fn, n_total, chunk, method
                )
            except _Unsupported as exc:
                excluded.add(exc.module_name)


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
    hooked = set()
    for layer in layers.values():
        mod = layer.module
        if layer.weight:
            hooked.add(mod.weight)
        if layer.bias:
            hooked.add(mod.bias)
        if method in ("ghost", "materialise"):
            layer.method = method
    fallback = [name for name, p in params.items() if p not in hooked]
    vmap_parts: dict[str, list[Tensor]] = defaultdict(list)
    for start in range(0, n_total, chunk):
        idx = slice(start, min(start + chunk, n_total))
        x, y = take(inputs, idx), take(targets, idx)
        n = min(start + chunk, n_total) - start
        if layers:
            _hook_pass(model, layers, x, y, forward, loss_fn, n)
        if fallback:
            for name, g in _vmap_grads(model, fallback, x, y, forward, loss_fn).items():
                vmap_parts[name].append(g.detach().reshape(n, -1))

    ref = next(iter(params.values()))
    blocks: dict[str, Tensor] = {}
    methods: dict[str, str] = {}
    for name, layer in layers.items():
        g = torch.zeros(n_total, n_total, dtype=ref.dtype, device=ref.device)
        if layer.weight and layer.method == "ghost":
            g += _ghost_gram(torch.cat(layer.a), torch.cat(layer.b))
        elif layer.weight:
            m = torch.cat(layer.grads)
            g += m @ m.T
        if layer.bias:
            s = torch.cat(layer.bias_sums)
            g += s @ s.T
        blocks[name] = g
        methods[name] = layer.method if layer.weight else "materialise"
    for pname in fallback:
        key = _module_prefix(pname)
        m = torch.cat(vmap_parts[pname])
        blocks[key] = blocks[key] + m @ m.T if key in blocks else m @ m.T
        methods[key] = "vmap"
    total = torch.zeros(n_total, n_total, dtype=ref.dtype, device=ref.device)
    for b in blocks.values():
        total += b
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
