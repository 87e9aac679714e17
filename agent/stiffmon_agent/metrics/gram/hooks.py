r"""The hook pass: one forward and one backward pass of a chunk collects every planned layer's
inputs a and output gradients b (the gradient of the summed per-example losses; example i's loss
depends only on example i's activations, so ∂(Σ_k L_k)/∂out_i = ∂L_i/∂out_i).

A call that shows no example dimension at all (a positional ``Embedding`` on ``arange(T)``, whose
output is broadcast over the batch) computes something every example shares: the network
continues on its output expanded to n identical copies, out_i = out, which broadcasting
downstream leaves unchanged in value, so that b_i = ∂L_i/∂out_i is each example's own gradient.
If the model does not broadcast it (the forward or the loss fails), the pass is redone without
expanding and those layers take the fallbacks; a silent difference is caught by :mod:`.verify`.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from stiffmon_agent.metrics.gram.contract import cat, embedding_dense, materialise
from stiffmon_agent.metrics.gram.plan import Block, Layer, Method, choose, is_capture
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
    broadcast: bool = True,
) -> set[str]:
    """One forward and backward pass of a chunk; add every hooked layer's factors.

    Returns the layers that cannot take the hook path (called with another batch layout, or never
    called: their parameters may be used functionally); their factors are not added.
    """
    calls: list[tuple[str, Any, dict[str, Tensor]]] = []  # (layer, context, nodes) per call
    failed: set[str] = set()
    expanded: set[str] = set()

    def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], Any]:
        rule = layers[name].rule
        # shared in an earlier chunk: still shared when the chunk size happens to equal T
        shared = layers[name].shared

        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
            x = args[0] if args else None
            if name in failed:
                return None
            if shared or not rule.valid_call(mod, x, out, n):  # type: ignore[union-attr]
                if broadcast and isinstance(x, Tensor) and (shared or _shared(x, out, n)):
                    one = _batch_of_one(x, out)
                    x, out = _expand(x, n, one), _expand(out, n, one)
                if not rule.valid_call(mod, x, out, n):  # type: ignore[union-attr]
                    failed.add(name)
                    return None
                expanded.add(name)
            calls.append((name, x.detach(), {"out": out}))  # type: ignore[union-attr]
            # the network continues on a copy: in-place ops after the layer (ReLU(inplace=True))
            # must not turn `out` into a different node of the graph
            return out.clone()

        return hook

    def recorder(name: str) -> Callable[[Any, dict[str, Tensor]], None]:
        def record(context: Any, nodes: dict[str, Tensor]) -> None:
            if name not in failed:
                calls.append((name, context, nodes))

        return record

    handles: list[Any] = []
    try:
        for name, layer in layers.items():
            if is_capture(layer.rule):
                install = layer.rule.install  # type: ignore[union-attr]
                handles.append(install(layer.module, n, recorder(name), partial(failed.add, name)))
            else:
                # before the user's own forward hooks: the layer's output as it computed it
                # (a user hook returning a changed output is then part of the backward)
                hook = make_hook(name)
                handles.append(layer.module.register_forward_hook(hook, prepend=True))
        with _any_attention():  # first derivatives only: the fused kernels may run
            outputs = forward(model, chunk_inputs)
    except Exception:
        if not expanded:
            raise
        outputs = None
    finally:
        for h in handles:
            h.remove()
    failed |= set(layers) - {c[0] for c in calls}
    kept = [c for c in calls if c[0] not in failed]
    nodes = [node for _, _, ns in kept for node in ns.values()]
    try:
        if outputs is None:
            raise RuntimeError("the forward failed on an expanded shared output")
        loss = per_example_losses(loss_fn, outputs, chunk_targets, n).sum()
        # a layer run under no_grad (a reentrant checkpoint none of whose inputs requires grad)
        # is outside the graph: its gradient is 0, as in training, and autograd.grad refuses it
        graphed = [i for i, node in enumerate(nodes) if node.requires_grad]
        gouts: list[Tensor | None] = [None] * len(nodes)
        if graphed:
            got = torch.autograd.grad(loss, [nodes[i] for i in graphed], allow_unused=True)
            for i, grad in zip(graphed, got, strict=True):
                gouts[i] = grad
        del loss, outputs
    except Exception:
        if not expanded:
            raise
        # the model does not broadcast a shared output: again, without expanding
        args = (model, layers, chunk_inputs, chunk_targets, forward, loss_fn, n, method)
        return hook_pass(*args, broadcast=False)
    # the recorded outputs are not needed any more, only their gradients (less memory)
    for i, g in enumerate(gouts):
        if g is None:
            gouts[i] = torch.zeros_like(nodes[i])
    sites = [(name, context, list(ns)) for name, context, ns in kept]
    calls.clear()
    kept.clear()
    nodes.clear()
    merged: dict[str, dict[str, list[tuple[str, Tensor, Tensor | None]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    pos = 0
    with torch.no_grad():
        for name, context, keys in sites:
            grads = {
                k: g
                for k, g in zip(keys, gouts[pos : pos + len(keys)], strict=True)
                if g is not None
            }
            gouts[pos : pos + len(keys)] = [None] * len(keys)
            pos += len(keys)
            layer = layers[name]
            rule = layer.rule
            if is_capture(rule):
                facs = rule.call_factors(layer.module, context, grads, n)  # type: ignore[union-attr]
            else:
                facs = rule.factors(layer.module, context, grads["out"], n)  # type: ignore[union-attr]
            for pname, fac in facs.items():
                if pname in layer.params:
                    merged[name][pname].append(fac)
        for name in list(merged):  # popped: each layer's gradients go once it is added
            per_param = merged.pop(name)
            layer = layers[name]
            try:
                for pname, facs in per_param.items():
                    _add(layer, pname, facs, n, method)
            except RuntimeError:  # calls whose factors do not stack (a layer used two ways)
                failed.add(name)
    for name in expanded - failed:
        layers[name].shared = True
    return failed


def _add(
    layer: Layer, pname: str, facs: list[tuple[str, Tensor, Tensor | None]], n: int, method: Method
) -> None:
    kind = facs[0][0]
    block = layer.blocks.setdefault(pname, Block(kind))
    if block.kind != kind or any(f[0] != kind for f in facs):
        raise RuntimeError(f"{layer.name}.{pname}: factors of different kinds")
    if kind == "dense":
        g = facs[0][1] if len(facs) == 1 else torch.stack([f[1] for f in facs]).sum(0)
        _append(block.grads, g, layer, pname)
        return
    a = cat([f[1] for f in facs], dim=2 if kind == "linear" else 1)
    b = cat([f[2] for f in facs], dim=2 if kind == "linear" else 1)  # type: ignore[misc]
    if pname in layer.tied:  # dense rows, summed with the other uses' (chunks.py)
        block.method = "materialise"
        if kind == "embedding":
            v = layer.params[pname].shape[0]
            _append(block.grads, embedding_dense(a, b, v), layer, pname)
            return
    if not block.method:
        block.method = choose(kind, a, b, n, method)
    if block.method == "materialise":
        _append(block.grads, materialise(a, b), layer, pname)
    else:
        _append(block.a, a, layer, pname)
        _append(block.b, b, layer, pname)


def _append(parts: list[Tensor], t: Tensor, layer: Layer, pname: str) -> None:
    """Add a chunk's tensor; chunks are concatenated along the examples, so the rest must agree."""
    if parts and parts[0].shape[1:] != t.shape[1:]:
        raise RuntimeError(f"{layer.name}.{pname}: chunks of shapes {parts[0].shape}, {t.shape}")
    parts.append(t)


def _any_attention() -> contextlib.AbstractContextManager[None]:
    """Every ``scaled_dot_product_attention`` backend this torch has (the measurement selects the
    math backend, whose double backward sharpness needs; the hook pass differentiates once)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    names = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
    return sdpa_kernel([getattr(SDPBackend, k) for k in names if hasattr(SDPBackend, k)])


def _shared(x: Any, out: Any, n: int) -> bool:
    """A call shared by every example: its input and output show no dimension of size n, or
    they are a batch of one (Hugging Face's position ids, (1, T))."""
    tensors = isinstance(x, Tensor) and isinstance(out, Tensor)
    if not tensors or x.dim() == 0 or n <= 1:
        return False
    return _batch_of_one(x, out) or (n not in x.shape and n not in out.shape)


def _batch_of_one(x: Tensor, out: Any) -> bool:
    return x.dim() >= 2 and x.shape[0] == 1 and isinstance(out, Tensor) and out.shape[:1] == (1,)


def _expand(t: Tensor, n: int, one: bool) -> Tensor:
    """n copies of a shared call's tensor along dim 0: a batch of one's first dimension
    becomes n, else a new first dimension."""
    return t.expand(n, *t.shape[1:]) if one else t.unsqueeze(0).expand(n, *t.shape)
