r"""The hook pass: one forward and one backward pass of a chunk collects every planned layer's
inputs a and output gradients b (the gradient of the summed per-example losses; example i's loss
depends only on example i's activations, so ∂(Σ_k L_k)/∂out_i = ∂L_i/∂out_i)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from stiffmon_agent.metrics.gram.contract import cat, materialise
from stiffmon_agent.metrics.gram.plan import Block, Layer, Method, choose
from stiffmon_agent.metrics.probe import Batch, ForwardFn, LossFn, per_example_losses


def hook_pass(
    model: nn.Module,
    layers: dict[str, Layer],
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
        rule = layers[name].rule

        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
            x = args[0] if args else None
            if name in failed or not rule.valid_call(mod, x, out, n):
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
            layer = layers[name]
            for pname, fac in layer.rule.factors(layer.module, x, gy, n).items():
                if pname in layer.params:
                    merged[name][pname].append(fac)
        for name, per_param in merged.items():
            layer = layers[name]
            for pname, facs in per_param.items():
                _add(layer, pname, facs, n, method)
    return failed


def _add(
    layer: Layer, pname: str, facs: list[tuple[str, Tensor, Tensor | None]], n: int, method: Method
) -> None:
    kind = facs[0][0]
    block = layer.blocks.setdefault(pname, Block(kind))
    if kind == "dense":
        block.grads.append(
            facs[0][1] if len(facs) == 1 else torch.stack([f[1] for f in facs]).sum(0)
        )
        return
    a = cat([f[1] for f in facs], dim=2 if kind == "linear" else 1)
    b = cat([f[2] for f in facs], dim=2 if kind == "linear" else 1)  # type: ignore[misc]
    if not block.method:
        block.method = choose(kind, a, b, n, method)
    if block.method == "materialise":
        block.grads.append(materialise(a, b))
    else:
        block.a.append(a)
        block.b.append(b)
