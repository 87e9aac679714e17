r"""Fallback 2: a per-example loop of backward passes, for modules ``vmap`` cannot run (RNNs,
``Embedding(max_norm=…)``, custom autograd functions). Exact by definition: each example is a
batch of one, as in the float64 reference."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stiffmon_agent.metrics.probe import (
    Batch,
    ForwardFn,
    LossFn,
    batch_size,
    per_example_losses,
    take,
)
from stiffmon_agent.metrics.state import flat_grads


def example_gradient(
    model: nn.Module,
    params: list[nn.Parameter],
    x: Batch,
    y: Batch,
    forward: ForwardFn,
    loss_fn: LossFn,
) -> Tensor:
    """Flat gradient of one example's loss (x, y hold one example) w.r.t. ``params``.

    A parameter the loss does not reach gets zeros; a sparse gradient
    (``Embedding(sparse=True)``) is made dense, its duplicate indices summed.
    """
    loss = per_example_losses(loss_fn, forward(model, x), y, 1)[0]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return flat_grads(grads, params)


def loop_grads(
    model: nn.Module,
    names: list[str],
    chunk_inputs: Batch,
    chunk_targets: Batch,
    forward: ForwardFn,
    loss_fn: LossFn,
) -> dict[str, Tensor]:
    """Per-example gradients of the parameters ``names``, one backward pass per example."""
    all_params = dict(model.named_parameters())
    params = [all_params[k] for k in names]
    n = batch_size(chunk_inputs)
    rows = [
        example_gradient(
            model,
            params,
            take(chunk_inputs, slice(i, i + 1)),
            take(chunk_targets, slice(i, i + 1)),
            forward,
            loss_fn,
        ).detach()
        for i in range(n)
    ]
    flat = torch.stack(rows)
    out: dict[str, Tensor] = {}
    start = 0
    for k, p in zip(names, params, strict=True):
        out[k] = flat[:, start : start + p.numel()].reshape(n, *p.shape)
        start += p.numel()
    return out
