r"""Per-example gradients grouped by layer: the blocks a sharded Gram matrix is assembled from.

G = Σ_l G_l with G_l[i, j] = g_{i,l} · g_{j,l}, where g_{i,l} is example i's gradient restricted
to the trainable parameters of layer l. When the examples of a probe live in different processes
(:mod:`~stiffmon_agent.distributed`), a cross term G_l[i, j] needs g_{i,l} and g_{j,l} side by
side, so each process materialises D_l, the (n, P_l) matrix of its examples' per-layer gradients,
and the blocks are exchanged layer by layer (memory bounded by the largest layer).

Layers with a hook rule (:mod:`~stiffmon_agent.metrics.gram`: linear, conv, norms) get their
per-example gradients from one forward and backward pass per chunk (``Σ_t b_i[t] a_i[t]ᵀ``);
embeddings and every other parameter get exact ``vmap(grad)`` gradients (else the per-example
loop). The same safety net as the Gram's checks diagonal and off-diagonal entries of D Dᵀ against
single-example backward passes and redoes everything exactly on a mismatch, with a warning.
Keys are those of :func:`~stiffmon_agent.metrics.gram.per_example_gram`'s ``layers``.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch
from torch import Tensor, nn

from stiffmon_agent.metrics.gram import GramResult
from stiffmon_agent.metrics.gram.contract import cat, materialise
from stiffmon_agent.metrics.gram.hooks import hook_pass
from stiffmon_agent.metrics.gram.loop import loop_grads
from stiffmon_agent.metrics.gram.plan import Layer, plan
from stiffmon_agent.metrics.gram.verify import check_entries
from stiffmon_agent.metrics.gram.vmap import vmap_grads
from stiffmon_agent.metrics.probe import (
    Batch,
    ForwardFn,
    LossFn,
    batch_size,
    default_forward,
    take,
    unreduced,
)
from stiffmon_agent.metrics.state import measurement_mode, trainable_parameters

__all__ = ["block_keys", "gram_from_blocks", "per_example_grad_blocks"]


def _hookable(model: nn.Module) -> dict[str, Layer]:
    # embeddings' dense per-example gradients come from vmap (their hook form is sparse)
    return {k: v for k, v in plan(model, "materialise").items() if not _is_embedding(v.module)}


def _is_embedding(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Embedding | nn.EmbeddingBag)


def block_keys(model: nn.Module) -> dict[str, str]:
    """Parameter name → layer key: the hooked module's name, else the parameter's module prefix
    (``"(root)"`` for the model's own parameters). Static: the same in every process."""
    hooked: dict[str, str] = {}
    for mname, layer in _hookable(model).items():
        for pname in layer.params:
            hooked[f"{mname}.{pname}" if mname else pname] = mname
    return {
        name: hooked.get(name, name.rsplit(".", 1)[0] if "." in name else "(root)")
        for name in trainable_parameters(model)
    }


def gram_from_blocks(blocks: dict[str, Tensor]) -> Tensor:
    """Σ_l D_l D_lᵀ of per-layer gradient blocks (n, P_l)."""
    return torch.stack([d @ d.T for d in blocks.values()]).sum(0)


def per_example_grad_blocks(
    model: nn.Module,
    inputs: Batch,
    targets: Batch,
    loss_fn: LossFn,
    *,
    forward: ForwardFn | None = None,
    chunk_size: int | None = 128,
    verify: bool = True,
) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """Per-example gradients of the trainable parameters, one (n, P_l) matrix per layer key.

    Args:
        model: The network (measured in eval mode; its state is restored).
        inputs: Examples along dim 0.
        targets: Targets, examples along dim 0.
        loss_fn: Loss module or per-example loss callable (see :mod:`.probe`).
        forward: ``forward(model, inputs)``; default ``model(inputs)``.
        chunk_size: Examples per forward/backward pass; None: all.
        verify: Check entries of D Dᵀ against single-example backward passes; on a mismatch
            recompute every block with the exact path (warning).

    Returns:
        The blocks, keyed as :func:`block_keys` (every key present, in its order), and notes on
        what fell back.
    """
    forward = forward or default_forward
    loss_fn = unreduced(loss_fn)
    n_total = batch_size(inputs)
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    keys = block_keys(model)
    chunk = n_total if not chunk_size else max(1, min(chunk_size, n_total))
    with measurement_mode(model):
        args = (model, params, inputs, targets, forward, loss_fn, n_total, chunk, keys)
        blocks, notes = _blocks(*args, exact_only=False)
        if verify and len(_hookable(model)):
            g = gram_from_blocks(blocks)
            bad = check_entries(model, list(params.values()), g, inputs, targets, forward, loss_fn)
            if bad is not None:
                note = (
                    f"per-example gradient blocks disagree with single-example backward passes "
                    f"({bad}); using the exact per-example path"
                )
                warnings.warn(f"stiffmon: {note}", RuntimeWarning, stacklevel=2)
                blocks, more = _blocks(*args, exact_only=True)
                notes = (*notes, *more, note)
    return blocks, notes


def _blocks(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    inputs: Batch,
    targets: Batch,
    forward: ForwardFn,
    loss_fn: LossFn,
    n_total: int,
    chunk: int,
    keys: dict[str, str],
    *,
    exact_only: bool,
) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    layers = {} if exact_only else _hookable(model)
    while True:  # a layer that fails the hook path in a later chunk: start again without it
        parts: dict[str, list[Tensor]] = defaultdict(list)
        notes: list[str] = []
        fallback: list[str] | None = None
        exact = "vmap"
        restart = False
        for start in range(0, n_total, chunk):
            stop = min(start + chunk, n_total)
            sl, n = slice(start, stop), stop - start
            x, y = take(inputs, sl), take(targets, sl)
            if layers:
                failed = hook_pass(model, layers, x, y, forward, loss_fn, n, "materialise")
                if failed and fallback is not None:
                    layers = {k: v.fresh() for k, v in layers.items() if k not in failed}
                    restart = True
                    break
                for name in failed:
                    layers.pop(name, None)
            if fallback is None:
                hooked = {id(p) for layer in layers.values() for p in layer.params.values()}
                fallback = [name for name, p in params.items() if id(p) not in hooked]
            if fallback:
                if exact == "vmap":
                    try:
                        grads = vmap_grads(model, fallback, x, y, forward, loss_fn)
                    except Exception as exc:  # RNNs, in-place parameter updates, …
                        exact = "loop"
                        notes.append(f"vmap(grad) cannot run this model ({type(exc).__name__})")
                if exact == "loop":
                    grads = loop_grads(model, fallback, x, y, forward, loss_fn)
                for name, g in grads.items():
                    parts[name].append(g.detach().reshape(n, -1))
        if not restart:
            break
    for mname, layer in layers.items():
        for pname, block in layer.blocks.items():
            full = f"{mname}.{pname}" if mname else pname
            if block.grads:
                parts[full] = list(block.grads)
            elif block.kind == "linear":
                parts[full] = [materialise(a, b) for a, b in zip(block.a, block.b, strict=True)]
            else:
                raise ValueError(f"no per-example gradients for a {block.kind!r} block of {mname}")
    out: dict[str, list[Tensor]] = {k: [] for k in dict.fromkeys(keys.values())}
    for name in params:
        out[keys[name]].append(cat(parts[name]).reshape(n_total, -1))
    return {k: cat(v, dim=1) for k, v in out.items()}, tuple(notes)


def blocks_gram_result(blocks: dict[str, Tensor], notes: tuple[str, ...] = ()) -> GramResult:
    """A :class:`~stiffmon_agent.metrics.gram.GramResult` from per-layer gradient blocks."""
    layers = {k: d @ d.T for k, d in blocks.items()}
    total = torch.stack(list(layers.values())).sum(0)
    return GramResult(total, layers, dict.fromkeys(layers, "materialise"), notes)
