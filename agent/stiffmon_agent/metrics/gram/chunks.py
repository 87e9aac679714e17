"""The chunked gradient pass shared by the one-process Gram and the sharded gradient blocks.

Per chunk of the probe: one hook pass for the layers with a rule (their factors or gradients
accumulate in the layers' blocks), and exact per-example gradients for every other parameter,
``vmap(grad)`` else the per-example loop. A layer that fails the hook pass in a later chunk (it
changed behaviour between chunks) restarts everything without it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from torch import Tensor, nn

from stiffmon_agent.metrics.gram.hooks import hook_pass
from stiffmon_agent.metrics.gram.loop import loop_grads
from stiffmon_agent.metrics.gram.plan import Layer, Method
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
    """

    layers: dict[str, Layer]
    fallback: list[str]
    parts: dict[str, list[Tensor]]
    exact: str
    notes: list[str]


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
                    layers = {k: v.fresh() for k, v in layers.items() if k not in failed}
                    restart = True
                    break
                for name in failed:
                    layers.pop(name, None)
            if fallback is None:
                hooked = {id(p) for layer in layers.values() for p in layer.params.values()}
                fallback = [name for name, p in params.items() if id(p) not in hooked]
            if not fallback:
                continue
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
            return ChunkedPass(layers, fallback or [], parts, exact, notes)
