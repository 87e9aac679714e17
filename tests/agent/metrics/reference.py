"""Independent brute-force references for the metric tests (float64, naive loops)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn


def loop_gradients(
    model: nn.Module, inputs: Any, targets: Tensor, loss_fn: Any, forward: Any = None
) -> Tensor:
    """N×P per-example gradients, one ``torch.autograd.grad`` call per example, in eval mode.

    Runs on a deep copy, so modules that change their weights in the forward
    (``Embedding(max_norm=…)``) leave the model under test alone.
    """
    model = copy.deepcopy(model)
    was = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    n = targets.shape[0]
    for i in range(n):
        if isinstance(inputs, dict):
            x = {k: v[i : i + 1] for k, v in inputs.items()}
            out = forward(model, x) if forward else model(**x)
        elif isinstance(inputs, tuple):
            x = tuple(v[i : i + 1] for v in inputs)
            out = forward(model, x) if forward else model(*x)
        else:
            x = inputs[i : i + 1]
            out = forward(model, x) if forward else model(x)
        loss = loss_fn(out, targets[i : i + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        )
    model.train(was)
    return torch.stack(rows)


def loop_gram(
    model: nn.Module, inputs: Any, targets: Tensor, loss_fn: Any, forward: Any = None
) -> Tensor:
    g = loop_gradients(model, inputs, targets, loss_fn, forward)
    return g @ g.T


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def dense_hessian_of(
    model: nn.Module,
    x: Any,
    objective: Any,
    *,
    vectorize: bool = False,
    args: tuple[Any, ...] | None = None,
) -> Tensor:
    """Dense Hessian, by ``torch.autograd.functional.hessian``, of ``objective(outputs)`` with
    ``outputs = model(x)`` (``model(*args)`` with ``args``) as a function of the trainable
    parameters (flattened in order), in the model's current mode."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def loss(v: Tensor) -> Tensor:
        chunks = v.split([math.prod(s) for s in shapes])
        p = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        inputs = args if args is not None else (x,)
        return objective(torch.func.functional_call(model, p, inputs, strict=False))

    return torch.autograd.functional.hessian(loss, flat, vectorize=vectorize)


TINY = 1e-20
"""The start of :func:`quadratic_growth`: Adam-like states (v ≈ (λx)²) stay ≪ ε², so P stays put."""


def quadratic_growth(
    opt: torch.optim.Optimizer, x: torch.nn.Parameter, lam: float, steps: int = 3000
) -> float:
    """|x| / :data:`TINY` after ``steps`` of the optimizer's own update on ½ λ x² (x reset to
    :data:`TINY` first): ≪ 1 where λ is below the optimizer's stability bound, ≫ 1 above it."""
    with torch.no_grad():
        x.fill_(TINY)
    for _ in range(steps):
        x.grad = lam * x.detach()
        opt.step()
    return float(x.detach().abs().max()) / TINY
