r"""Per-example gradient Gram matrix G[i, j] = g_i · g_j without materialising the N×P gradients.

g_i = ∇_θ L_i is the gradient of example i's contribution to the training objective
(:mod:`~stiffmon_agent.metrics.probe`) with respect to the trainable parameters θ. G = Σ_l G_l
splits into one block per layer l.

Layers with a registered rule (:mod:`.rules`: :mod:`.linear`, :mod:`.conv`, :mod:`.embedding`,
:mod:`.norms`, :mod:`.attention`) take the hook path: one forward and one backward pass per
chunk give each layer's inputs a_i[t] and output gradients b_i[t] (:mod:`.hooks`); per layer
:mod:`.plan` takes the cheaper of the ghost form Σ_{t,s} (a_i[t]·a_j[s]) (b_i[t]·b_j[s]) and
materialised per-layer gradients Σ_t b_i[t] a_i[t]ᵀ (Bu et al. 2022); :mod:`.contract` holds the
contractions.

Parameters of any other module (GroupNorm, custom modules, raw parameters), parameters shared
between modules (weight tying) and layers inside modules that are not batch-first get exact
per-example gradients from ``torch.func.vmap(grad)`` restricted to just those parameters
(:mod:`.vmap`), and where vmap cannot run (RNNs, ``Embedding(max_norm)``) from a per-example
loop of backward passes (:mod:`.loop`). The safety net (:mod:`.verify`) checks several diagonal
entries and an off-diagonal entry of a fast Gram against single-example backward passes and
falls back to the exact paths on a mismatch, with a warning. The measurement runs in eval mode
and leaves the model as it was
(:func:`~stiffmon_agent.metrics.state.measurement_mode`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

# the per-family rules register themselves on import
from stiffmon_agent.metrics.gram import attention, conv, embedding, linear, norms  # noqa: F401
from stiffmon_agent.metrics.gram.chunks import chunked_pass
from stiffmon_agent.metrics.gram.contract import cat, embedding_gram, ghost_gram, rows_gram
from stiffmon_agent.metrics.gram.coupling import coupled
from stiffmon_agent.metrics.gram.loop import loop_grads
from stiffmon_agent.metrics.gram.plan import Block, Layer, Method, gram_flops_estimate, plan
from stiffmon_agent.metrics.gram.verify import (
    SumCheckSchedule,
    check_entries,
    check_weighted_sum,
    mismatch_note,
)
from stiffmon_agent.metrics.gram.vmap import vmap_grads
from stiffmon_agent.metrics.probe import (
    Batch,
    ForwardFn,
    LossFn,
    batch_size,
    default_forward,
    unreduced,
)
from stiffmon_agent.metrics.state import measurement_mode, trainable_parameters

__all__ = ["GramResult", "gram_flops_estimate", "per_example_gradients", "per_example_gram"]


@dataclass(frozen=True)
class GramResult:
    """Per-example gradient Gram matrix and its per-layer blocks.

    Attributes:
        total: G, shape (N, N), G[i, j] = g_i · g_j.
        layers: Per-layer blocks G_l keyed by module name (``"(root)"`` for the model's own
            parameters); they sum to ``total``.
        methods: How each block was computed: ``"ghost"``, ``"materialise"``, ``"vmap"`` or
            ``"loop"``.
        notes: What fell back and why (also issued as warnings).
    """

    total: Tensor
    layers: dict[str, Tensor] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def norms(self) -> Tensor:
        """Per-example gradient norms ‖g_i‖ = sqrt(G[i, i])."""
        return self.total.diagonal().clamp_min(0).sqrt()


_sum_checks = SumCheckSchedule()  # the one-process Gram's (the sharded blocks keep their own)


def _module_prefix(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else "(root)"


def _block_gram(block: Block) -> Tensor:
    if block.kind == "dense" or block.method == "materialise":
        return rows_gram(block.grads)
    a, b = cat(block.a), cat(block.b)
    return embedding_gram(a, b) if block.kind == "embedding" else ghost_gram(a, b)


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
            excluded). Measured in eval mode; mode, buffers, ``.grad``, parameters and RNG
            state are restored.
        inputs: Probe inputs (tensor or tuple/list/dict of tensors), examples along dim 0.
        targets: Probe targets, examples along dim 0.
        loss_fn: ``loss_fn(outputs, targets)``; a ``torch.nn`` loss module (its reduction is
            switched to ``"none"`` on a copy; a ``"sum"`` reduction sums each example's
            elements) or a callable returning per-example losses.
        forward: ``forward(model, inputs) -> outputs``; default ``model(inputs)``.
        chunk_size: Examples per forward/backward pass (bounds activation memory); None: all.
        method: ``"auto"`` picks ghost or materialised per layer; ``"ghost"`` /
            ``"materialise"`` force one for every hooked layer; ``"vmap"`` uses
            ``torch.func.vmap(grad)`` for every parameter (the slow baseline), ``"loop"`` a
            per-example loop.
        verify: Check diagonal and off-diagonal entries against single-example backward passes
            (relative 1e-8 in float64, 1e-4 in float32) and redo everything exactly on a
            mismatch, with a warning; where the exact (example-alone) paths were used, check
            whether the per-example gradients add up to the gradient of the summed losses
            (:mod:`.coupling`: a note if not, an error if they all vanish).

    Returns:
        G and its per-layer blocks; G's dtype and device are those of the parameters.

    Raises:
        ValueError: If the model has no trainable parameter, the probe is malformed, or (with
            ``verify``) every example-alone gradient vanishes while the summed loss has one.
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
        args = (model, params, inputs, targets, forward, loss_fn, n_total, chunk)
        result = _gram(*args, plan(model, method), method)
        fast = any(m in ("ghost", "materialise") for m in result.methods.values())
        if verify and fast:
            bad = check_entries(model, list(params.values()), result.total, *args[2:6])
            if bad is None and _sum_checks.due(model):  # the entries miss errors confined to
                # other examples (a graph's rows)
                bad = check_weighted_sum(
                    model, list(params.values()), result.total, *args[2:6], chunk
                )
                if bad is not None:
                    _sum_checks.failed(model)
            if bad is not None:
                note = mismatch_note("per-example Gram fast path", bad)
                warnings.warn(f"stiffmon: {note}", RuntimeWarning, stacklevel=2)
                result = _gram(*args, {}, "vmap")
                result = GramResult(result.total, result.layers, result.methods, (note,))
        if verify and any(m in ("vmap", "loop") for m in result.methods.values()):
            note = coupled(model, list(params.values()), result.total, *args[2:])
            if note is not None:
                warnings.warn(f"stiffmon: {note}", RuntimeWarning, stacklevel=2)
                notes = (*result.notes, note)
                result = GramResult(result.total, result.layers, result.methods, notes)
        return result


def _gram(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    inputs: Batch,
    targets: Batch,
    forward: ForwardFn,
    loss_fn: LossFn,
    n_total: int,
    chunk: int,
    layers: dict[str, Layer],
    method: Method,
) -> GramResult:
    done = chunked_pass(
        model, params, inputs, targets, forward, loss_fn, n_total, chunk, layers, method
    )
    layers, fallback, parts, exact = done.layers, done.fallback, done.parts, done.exact
    notes = done.notes

    blocks: dict[str, Tensor] = {}
    methods: dict[str, str] = {}
    for name, layer in layers.items():
        for pname, block in layer.blocks.items():  # keyed by the module owning the parameter
            key = _module_prefix(f"{name}.{pname}" if name else pname)
            g = _block_gram(block)
            blocks[key] = blocks[key] + g if key in blocks else g
            if block.method or key not in methods:
                methods[key] = block.method or "materialise"
    for pname in (*fallback, *done.tied):
        key = _module_prefix(pname)
        g = rows_gram(parts[pname])
        blocks[key] = blocks[key] + g if key in blocks else g
        methods[key] = exact if pname in fallback else "materialise"
    total = torch.stack(list(blocks.values())).sum(0)
    return GramResult(total=total, layers=blocks, methods=methods, notes=tuple(notes))


def per_example_gradients(
    model: nn.Module,
    inputs: Batch,
    targets: Batch,
    loss_fn: LossFn,
    *,
    forward: ForwardFn | None = None,
) -> Tensor:
    """The N×P matrix of flattened per-example gradients (``vmap(grad)``, else the loop).

    Used by the gradient-noise helpers that need explicit gradients, and as a baseline.
    """
    forward = forward or default_forward
    loss_fn = unreduced(loss_fn)
    names = list(trainable_parameters(model))
    with measurement_mode(model):
        try:
            grads = vmap_grads(model, names, inputs, targets, forward, loss_fn)
        except Exception:
            grads = loop_grads(model, names, inputs, targets, forward, loss_fn)
    n = batch_size(inputs)
    return torch.cat([grads[k].reshape(n, -1) for k in names], dim=1)
