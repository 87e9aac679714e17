"""Probe batches: the pytree of tensors a probe is, the forward call, and the per-example loss.

A probe is ``(inputs, targets)`` where ``inputs`` and ``targets`` are tensors, or tuples / lists /
dicts of tensors, whose leading dimension indexes the N examples (:func:`batch_size`,
:func:`take`, :func:`to`). Unless a ``forward`` callable is given, the model is called as
``model(x)`` for a tensor, ``model(*x)`` for a tuple or list and ``model(**x)`` for a dict
(:func:`default_forward`; :class:`ForwardModule` wraps a custom one). :class:`PerExampleLoss`
is a loss with one value per example that remembers how the training objective reduces the
examples' losses (:func:`loss_reduction`: ``"mean"`` or ``"sum"``, see
:mod:`~stiffmon_agent.metrics.probe` for L_i); :func:`unreduced` makes one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeAlias

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

Batch: TypeAlias = Any
"""A tensor or a (nested) tuple / list / dict of tensors with examples along dim 0."""

ForwardFn: TypeAlias = Callable[[nn.Module, Batch], Any]
LossFn: TypeAlias = Callable[[Any, Batch], torch.Tensor]


def batch_size(batch: Batch) -> int:
    """Number of examples N: the common leading dimension of every tensor in ``batch``.

    Raises:
        ValueError: If ``batch`` holds no tensor or the leading dimensions differ.
    """
    leaves = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]
    if not leaves:
        raise ValueError("the probe batch contains no tensor")
    sizes = {t.shape[0] if t.dim() else -1 for t in leaves}
    if len(sizes) != 1 or -1 in sizes:
        shapes = ", ".join(str(tuple(t.shape)) for t in leaves[:8])
        more = f" and {len(leaves) - 8} more" if len(leaves) > 8 else ""
        raise ValueError(
            f"every probe tensor needs the same leading (example) dimension, got shapes "
            f"{shapes}{more}: examples go along dim 0 of every tensor; where they are not rows "
            f"of tensors (a batched graph's nodes and edges, packed sequences), give the probe "
            f"as example indices, probe=(torch.arange(N), targets), and build their batch in "
            f"forward=lambda model, idx: ... (e.g. collate the graphs idx)"
        )
    return int(sizes.pop())


def take(batch: Batch, index: slice | torch.Tensor) -> Batch:
    """Select examples ``index`` from every tensor of ``batch``."""
    return tree_map(lambda t: t[index] if isinstance(t, torch.Tensor) else t, batch)


def to(batch: Batch, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Batch:
    """Move ``batch`` to ``device``; cast its floating-point tensors to ``dtype``."""

    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    return tree_map(move, batch)


def default_forward(model: nn.Module, inputs: Batch) -> Any:
    """Call ``model`` on ``inputs``: ``model(x)``, ``model(*x)`` or ``model(**x)``."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


Reduction: TypeAlias = Literal["mean", "sum"]


def loss_reduction(loss_fn: LossFn) -> Reduction:
    """How ``loss_fn`` combines per-example losses into the training objective.

    ``"sum"`` for a loss whose ``reduction`` attribute is ``"sum"``; ``"mean"`` otherwise (a
    ``torch.nn`` loss with ``reduction="mean"``, and by convention ``reduction="none"`` modules
    and plain per-example callables, whose batch reduction the agent cannot see).
    """
    if isinstance(loss_fn, PerExampleLoss):
        return loss_fn.objective
    return "sum" if getattr(loss_fn, "reduction", "mean") == "sum" else "mean"


class PerExampleLoss:
    """An unreduced loss that remembers how the training objective reduces it.

    Attributes:
        fn: Returns per-example (or per-element) losses.
        objective: ``"mean"`` or ``"sum"`` over the examples (see :func:`loss_reduction`).
        elements: How an example's elements (tokens, outputs) make its loss: ``"sum"`` for a
            sum-reduced loss and for ``KLDivLoss(reduction="batchmean")`` (a mean over the
            batch of per-example sums), else ``"mean"``.
        scale: Multiplies every per-example loss.
        count_mean: c̄ of a class-index loss whose objective divides by the batch's count of
            counted positions (see the module docstring): where the losses line up with the
            targets, L_i = Σ_t c_it ℓ_it / c̄; None: each example's own mean (a class ``weight``
            with one target per example: w_{y_i} ℓ_i).
        on_count: Called once, with whether c̄ applied, the first time the losses are read with
            a ``count_mean`` (it does not where they do not line up with the targets: a loss
            returning one value per example is used as it is); then cleared.
    """

    def __init__(
        self,
        fn: LossFn,
        objective: Reduction,
        elements: Reduction | None = None,
        scale: float = 1.0,
        count_mean: float | None = None,
    ) -> None:
        self.fn = fn
        self.objective: Reduction = objective
        self.elements: Reduction = elements or objective
        self.scale = scale
        self.count_mean = count_mean
        self.on_count: Callable[[bool], None] | None = None

    def __call__(self, outputs: Any, targets: Batch) -> torch.Tensor:
        return self.fn(outputs, targets)


def inner_loss(loss_fn: LossFn) -> Any:
    """The loss a :class:`PerExampleLoss` wraps; any other loss itself."""
    return loss_fn.fn if isinstance(loss_fn, PerExampleLoss) else loss_fn


def unreduced(loss_fn: LossFn) -> PerExampleLoss:
    """Return a version of ``loss_fn`` that gives one loss per example.

    A ``torch.nn`` loss module with a ``reduction`` attribute is copied with
    ``reduction="none"``; any other callable is used as is and must return per-example losses.
    The objective's reduction (:func:`loss_reduction`) is kept on the result.
    """
    if isinstance(loss_fn, PerExampleLoss):
        return loss_fn
    objective = loss_reduction(loss_fn)
    batchmean = getattr(loss_fn, "reduction", None) == "batchmean"
    if isinstance(loss_fn, nn.Module) and hasattr(loss_fn, "reduction"):
        if loss_fn.reduction != "none":
            loss_fn = copy.copy(loss_fn)
            loss_fn.reduction = "none"
    return PerExampleLoss(loss_fn, objective, "sum" if batchmean else objective)


def output_hint(outputs: Any) -> str:
    """What to pass as ``forward=`` when the model's output is not the tensor the loss takes."""
    kind = type(outputs).__name__
    if isinstance(outputs, Mapping) or hasattr(outputs, "logits"):
        keys = list(outputs) if isinstance(outputs, Mapping) else []
        tensors = [k for k in keys if isinstance(outputs[k], torch.Tensor)]
        if hasattr(outputs, "logits") and not isinstance(outputs, Mapping):
            pick, shown = ".logits", ""
        else:
            key = "logits" if "logits" in tensors else (tensors or ["logits"])[0]
            pick, shown = f"[{key!r}]", f" (keys {', '.join(map(repr, keys[:6]))})"
        what = f"a {kind}{shown}"
    elif isinstance(outputs, tuple | list):
        pick, what = "[0]", f"a {kind} of {len(outputs)}"
    else:
        pick, what = "", f"a {kind}"
    fix = (
        f"pass Agent(forward=lambda model, x: model(x){pick})"
        if pick
        else "pass Agent(forward=...) returning the tensor the loss takes"
    )
    return f"the model returns {what}, not the tensor the loss takes: {fix}"


class ForwardModule(nn.Module):
    """Wraps ``forward(model, inputs)`` as a module, so ``torch.func.functional_call`` can run a
    custom forward; the model's parameters appear under the prefix ``model.``."""

    def __init__(self, model: nn.Module, fn: ForwardFn) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, inputs: Batch) -> Any:
        return self.fn(self.model, inputs)
