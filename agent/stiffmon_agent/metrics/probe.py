"""Per-example losses of a probe batch (and, re-exported, the probe-batch helpers).

The batch helpers live in :mod:`~.probe_batch` (slicing pytrees of tensors by example, the
forward call, :class:`PerExampleLoss`) and the counting of class-index targets in
:mod:`~.counted_targets`; both are importable from here as before.

A probe is ``(inputs, targets)`` where ``inputs`` and ``targets`` are tensors, or tuples / lists /
dicts of tensors, whose leading dimension indexes the N examples. Integer inputs (token ids) are
fine. Unless a ``forward`` callable is given, the model is called as ``model(x)`` for a tensor,
``model(*x)`` for a tuple or list and ``model(**x)`` for a dict.

Per-example losses are each example's contribution L_i to the objective the optimizer steps on
(:func:`loss_reduction`). A ``torch.nn`` loss with ``reduction="mean"`` averages all elements, so
L_i is the mean of example i's elements (tokens, target dimensions) and the objective over a
batch of B is (1/B) Σ_i L_i; with ``reduction="sum"`` L_i is the sum of example i's elements and
the objective is Σ_i L_i = B × (1/B) Σ_i L_i. A plain callable must return one loss per example
(or per element, averaged per example); its objective is taken to be the mean over the batch,
unless the callable has a ``reduction`` attribute equal to ``"sum"``.

Class-index targets (a ``CrossEntropyLoss`` / ``NLLLoss``, or a plain callable whose ignore
index is its ``ignore_index`` attribute, a ``functools.partial``'s keyword, else -100): position t
of example i counts with weight c_it, 0 where the target is the ignore index, the target class's
``weight`` where the loss has class weights, else 1. For the loss as given, L_i is what the
mean-reduced loss gives for example i alone, Σ_t c_it ℓ_it / Σ_t c_it over its counted positions
(0 for an example with none), and (1/B) Σ_i L_i is the mean of the examples' own means. The
mean-reduced loss of a batch divides by the whole batch's count, Σ_{i,t} c_it ℓ_it /
Σ_{i,t} c_it, and so does Hugging Face's causal-LM loss: the same only when every example counts
as much. A :class:`PerExampleLoss` with ``count_mean`` c̄ gives that
objective's contributions instead, L_i = Σ_t c_it ℓ_it / c̄ (torch's ``reduction="none"`` gives
c_it ℓ_it, and 0 at ignored positions): with c̄ = (1/N) Σ_{i,t} c_it over N examples, (1/N)
Σ_i L_i is the mean-reduced loss on them. The agent builds it from the train probe
(:func:`~stiffmon_agent.probe_set.probe_weighting`); the functions here take the loss as given.
One target per example ((B,) targets) is the special case T = 1: a class ``weight`` makes the
objective Σ_i w_{y_i} ℓ_i / Σ_i w_{y_i}, so L_i = w_{y_i} ℓ_i / w̄. A loss that flattens (B, T)
to B·T values (a wrapper calling ``CrossEntropyLoss`` on ``logits.reshape(-1, V)``) is read back
as (B, T) when the targets have that shape.
"""

from __future__ import annotations

from typing import Any

import torch

from stiffmon_agent.metrics.counted_targets import (
    IGNORE_INDEX,
    _check_ignore_index,
    _check_lined_up,
    _counted,
    callable_ignore_index,
    class_dim,
    class_weights_of,
    counted_examples,
    counted_weights,
    ignore_index_of,
)
from stiffmon_agent.metrics.probe_batch import (
    Batch,
    ForwardFn,
    ForwardModule,
    LossFn,
    PerExampleLoss,
    Reduction,
    batch_size,
    default_forward,
    inner_loss,
    loss_reduction,
    output_hint,
    take,
    to,
    unreduced,
)

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "ForwardFn",
    "ForwardModule",
    "LossFn",
    "PerExampleLoss",
    "Reduction",
    "batch_size",
    "callable_ignore_index",
    "class_dim",
    "class_weights_of",
    "counted_examples",
    "counted_weights",
    "default_forward",
    "ignore_index_of",
    "inner_loss",
    "loss_reduction",
    "output_hint",
    "per_example_losses",
    "take",
    "to",
    "unreduced",
]


def per_example_losses(loss_fn: LossFn, outputs: Any, targets: Batch, n: int) -> torch.Tensor:
    """Per-example losses L_i, shape ``(n,)``: each example's contribution to the objective.

    Non-batch dimensions of an unreduced loss (tokens of a sequence, target dimensions) are
    averaged when the objective is a mean (L_i is what a mean-reduced loss gives for example i
    alone) and summed when it is a sum (Σ_i L_i is the sum-reduced loss) or a mean over the
    batch of per-example sums (``KLDivLoss(reduction="batchmean")``); see
    :func:`loss_reduction` and :class:`PerExampleLoss`. Class-index targets with a
    ``count_mean`` c̄: L_i = Σ_t c_it ℓ_it / c̄ (the module docstring).

    Raises:
        ValueError: If ``loss_fn`` reduces over the batch (returns fewer than ``n`` values).
    """
    try:
        losses = loss_fn(outputs, targets)
    except TypeError as exc:
        from stiffmon_agent.failure_hints import loss_signature_note  # only on a failure

        if (note := loss_signature_note(loss_fn)) is not None:  # (input, target, var) ...
            raise TypeError(note) from exc
        if isinstance(outputs, torch.Tensor):
            raise
        raise TypeError(f"{output_hint(outputs)} ({exc})") from exc
    if not isinstance(losses, torch.Tensor):
        raise ValueError(f"loss_fn returned {type(losses).__name__}, expected a tensor")
    if (  # a wrapper that flattened (B, T) targets and their logits: read back as (B, T)
        losses.dim() == 1
        and losses.shape[0] != n
        and isinstance(targets, torch.Tensor)
        and targets.dim() > 1
        and targets.shape[0] == n
        and targets.numel() == losses.numel()
    ):
        losses = losses.reshape(targets.shape)
    if losses.dim() == 0 or losses.shape[0] != n:
        raise ValueError(
            f"loss_fn must return one loss per example (shape ({n},)), got shape "
            f"{tuple(losses.shape)}; pass a torch.nn loss module or use reduction='none'"
        )
    _check_ignore_index(loss_fn, outputs, targets, losses)
    out = _per_example(loss_fn, losses, targets, n)
    scale = loss_fn.scale if isinstance(loss_fn, PerExampleLoss) else 1.0
    return out * scale if scale != 1.0 else out


def _per_example(loss_fn: LossFn, losses: torch.Tensor, targets: Batch, n: int) -> torch.Tensor:
    """(n,) per-example losses from the (n, …) unreduced ``losses`` (see
    :func:`per_example_losses`)."""
    cbar = loss_fn.count_mean if isinstance(loss_fn, PerExampleLoss) else None
    if losses.dim() > 1:
        flat = losses.reshape(n, -1)
        elements = loss_fn.elements if isinstance(loss_fn, PerExampleLoss) else None
        if (elements or loss_reduction(loss_fn)) == "sum":
            return flat.sum(dim=1)
        counted = _counted(loss_fn, targets, losses.shape)
        if counted is None:
            _check_lined_up(loss_fn, targets, losses.shape)
            _count_applied(loss_fn, False)
            return flat.mean(dim=1)
        if cbar is not None:  # the batch's count divides: Σ_t c_it ℓ_it / c̄
            _count_applied(loss_fn, True)
            return flat.sum(dim=1) / cbar
        total = counted.reshape(n, -1).sum(dim=1).to(flat.dtype)
        return torch.where(total > 0, flat.sum(dim=1) / total.clamp_min(1e-30), 0.0)
    if cbar is not None and _counted(loss_fn, targets, losses.shape) is not None:
        _count_applied(loss_fn, True)
        return losses / cbar  # one target per example: w_{y_i} ℓ_i / w̄
    _count_applied(loss_fn, False)
    return losses


def _count_applied(loss_fn: LossFn, applied: bool) -> None:
    """Tell the loss's ``on_count`` (once) whether its ``count_mean`` applied."""
    if isinstance(loss_fn, PerExampleLoss) and loss_fn.on_count is not None:
        say, loss_fn.on_count = loss_fn.on_count, None
        say(applied)
