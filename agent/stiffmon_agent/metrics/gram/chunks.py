"""The chunked gradient pass shared by the one-process Gram and the sharded gradient blocks.

Per chunk of the probe: one hook pass for the layers with a rule (their factors or gradients
accumulate in the layers' blocks), and exact per-example gradients for every other parameter,
``vmap(grad)`` else the per-example loop. A tied weight's uses are summed at the end. A layer
that fails the hook pass in a later chunk (it changed behaviour between chunks) restarts
everything without it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from torch import Tensor, nn

from stiffmon_agent.metrics.gram.hooks import hook_pass
from stiffmon_agent.metrics.gram.loop import loop_grads
from stiffmon_agent.metrics.gram.plan import Layer, Method, untie_incomplete
from stiffmon_agent.metrics.gram.vmap import vmap_grads
from stiffmon_agent.metrics.probe import Batch, ForwardFn, LossFn, take


@dataclass
class ChunkedPass:
    """What :func:`chunked_pass` collected.

    Attributes:
        layers: The hooked layers that held for every chunk (their blocks filled).
        fallback: Names of the parameters no kept layer covers.
        parts: Per fallback parameter, its (n, P) per-example gradients of each chunk.
        exact: ``"vmap"`` or ``"loop"``: how the fallback gradients were computed.
        notes: Why the loop was used, if it was.
        tied: Names of the tied parameters (:attr:`~.plan.Layer.tied`) whose per-example
            gradients, the sum of every hooked use's, are in ``parts`` (materialised).
    """

    layers: dict[str, Layer]
    fallback: list[str]
    parts: dict[str, list[Tensor]]
    exact: str
    notes: list[str]
    tied: list[str]


def chunked_pass(
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
) -> ChunkedPass:
    """Run the probe through in chunks of ``chunk`` examples (see the module docstring)."""
    while True:
        fallback: list[str] | None = None
        exact = "loop" if method == "loop" else "vmap"
        notes: list[str] = []
        parts: dict[str, list[Tensor]] = defaultdict(list)
        restart = False
        for start in range(0, n_total, chunk):
            idx = slice(start, min(start + chunk, n_total))
            x, y = take(inputs, idx), take(targets, idx)
            n = min(start + chunk, n_total) - start
            if layers:
                failed = hook_pass(model, layers, x, y, forward, loss_fn, n, method)
                if failed and fallback is not None:  # a layer changed behaviour between chunks
                    kept = {k: v.fresh() for k, v in layers.items() if k not in failed}
                    layers = untie_incomplete(model, kept)
                    restart = True
                    break
                for name in failed:
                    layers.pop(name, None)
                if failed:  # a tied weight's other uses go to the fallbacks with it
                    layers = untie_incomplete(model, layers)
            if fallback is None:
                hooked = {id(p) for layer in layers.values() for p in layer.params.values()}
                fallback = [name for name, p in params.items() if id(p) not in hooked]
            if not fallback:
                continue
            if exact == "vmap" and (renorm := _renormalising_embedding(model)):
                exact = "loop"  # vmap cannot batch the in-place embedding_renorm_
                notes.append(
                    f"{renorm} renormalises its rows in place during the forward, which "
                    f"vmap(grad) cannot batch; per-example loop for {len(fallback)} parameter "
                    "tensors (exact, slower)"
                )
            if exact == "vmap":
                try:
                    grads = vmap_grads(model, fallback, x, y, forward, loss_fn)
                except Exception as exc:  # RNNs, in-place parameter updates, …: loop instead
                    exact = "loop"
                    notes.append(
                        f"vmap(grad) cannot run this model ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]}); per-example loop for "
                        f"{len(fallback)} parameter tensors"
                    )
            if exact == "loop":
                grads = loop_grads(model, fallback, x, y, forward, loss_fn)
            for name, g in grads.items():
                parts[name].append(g.detach().reshape(n, -1))
        if not restart:
            tied = _sum_tied(layers, params, parts)
            return ChunkedPass(layers, fallback or [], parts, exact, notes, tied)


def _sum_tied(
    layers: dict[str, Layer], params: dict[str, nn.Parameter], parts: dict[str, list[Tensor]]
) -> list[str]:
    """Move each tied parameter's per-example gradients out of its layers' blocks into
    ``parts``, the uses summed chunk by chunk; the names of those parameters."""
    name_of = {id(q): name for name, q in params.items()}
    uses: dict[str, list[list[Tensor]]] = defaultdict(list)
    for layer in layers.values():
        for pname in layer.tied:
            block = layer.blocks.pop(pname, None)
            if block is not None:
                uses[name_of[id(layer.params[pname])]].append(block.grads)
    for name, chunks in uses.items():
        parts[name] = [sum(c[1:], c[0]) for c in zip(*chunks, strict=True)]
    return list(uses)


def _renormalising_embedding(model: nn.Module) -> str | None:
    """The name of the first ``Embedding`` / ``EmbeddingBag`` of ``model`` with ``max_norm`` (its
    forward rescales looked-up rows to norm ≤ max_norm in place, ``embedding_renorm_``), else
    None."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding | nn.EmbeddingBag) and mod.max_norm is not None:
            return f"{type(mod).__name__}(max_norm={mod.max_norm:g}) {name or '(root)'!r}"
    return None
