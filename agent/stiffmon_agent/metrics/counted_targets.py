"""Which target positions a class-index loss counts, and with what weight.

For a ``CrossEntropyLoss`` / ``NLLLoss`` (or a plain callable, whose ignore index is
:func:`callable_ignore_index`), position t of example i counts with weight c_it: 0 where the
target is the ignore index, the target class's ``weight`` where the loss has class weights,
else 1. A mean-reduced loss divides by Σ_{i,t} c_it (see :mod:`~stiffmon_agent.metrics.probe`).
Also the checks that refuse per-element losses whose ignored positions cannot be told.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from stiffmon_agent.metrics.hidden_ignore import refuse_hidden_ignore
from stiffmon_agent.metrics.probe_batch import Batch, LossFn, inner_loss, unreduced

IGNORE_INDEX = -100
"""The ignore index assumed for a plain callable (torch's and Hugging Face's default)."""


def callable_ignore_index(fn: Any) -> int:
    """The ignore index of a plain callable loss: its ``ignore_index`` attribute, or that keyword
    of a ``functools.partial`` (``partial(F.cross_entropy, ignore_index=255, reduction="none")``),
    else :data:`IGNORE_INDEX`."""
    value = getattr(fn, "ignore_index", None)
    if value is None and isinstance(fn, functools.partial):
        value = fn.keywords.get("ignore_index")
    return IGNORE_INDEX if value is None else int(value)


def counted_weights(loss_fn: LossFn, targets: Batch) -> torch.Tensor | None:
    """Each example's count Σ_t c_it in a mean-reduced class-index loss (its targets that are
    not ``ignore_index``, each weighed by its class ``weight``; see the module docstring), shape
    (n,); None when the targets are not class indices (every element counts alike) or the loss
    sums an example's elements."""
    loss_fn = unreduced(loss_fn)
    if loss_fn.elements == "sum" or not isinstance(targets, torch.Tensor) or targets.dim() < 1:
        return None
    counted = _counted(loss_fn, targets, targets.shape)
    return None if counted is None else counted.reshape(targets.shape[0], -1).sum(dim=1)


def counted_examples(loss_fn: LossFn, targets: Batch) -> torch.Tensor | None:
    """Whether each example has an element a mean-reduced class-index loss counts (a target
    not ``ignore_index``, of a non-zero class weight), shape (n,); None when the targets are not
    per-element class indices (every example counts). An example without one has no loss of
    its own: its mean over counted positions is 0/0."""
    totals = counted_weights(loss_fn, targets)
    return None if totals is None else totals > 0


def class_weights_of(loss_fn: LossFn) -> torch.Tensor | None:
    """The class ``weight`` of a ``CrossEntropyLoss`` / ``NLLLoss`` (None without one)."""
    ignored = _ignored(unreduced(loss_fn))
    return None if ignored is None else ignored[1]


def _class_index(targets: Batch) -> bool:
    return isinstance(targets, torch.Tensor) and not (
        targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool
    )


def _ignored(loss_fn: LossFn) -> tuple[int, torch.Tensor | None] | None:
    """The ignore index and class weights of a class-index loss; None for another torch.nn
    loss (its elements count alike)."""
    fn = inner_loss(loss_fn)
    if isinstance(fn, nn.CrossEntropyLoss | nn.NLLLoss):
        return fn.ignore_index, fn.weight
    if isinstance(fn, nn.Module) and hasattr(fn, "reduction"):
        return None
    return callable_ignore_index(fn), None


def ignore_index_of(loss_fn: LossFn) -> int | None:
    """The target value a class-index loss leaves out (``ignore_index`` of a
    ``CrossEntropyLoss`` / ``NLLLoss``, -100 for a plain callable); None for other losses."""
    ignored = _ignored(unreduced(loss_fn))
    return None if ignored is None else int(ignored[0])


def _check_lined_up(loss_fn: LossFn, targets: Batch, shape: torch.Size) -> None:
    """Refuse per-element losses that do not line up with class-index targets holding ignored
    positions (a loss that shifts the labels of a causal LM itself): which losses each
    example's mean leaves out cannot be told, and counting the ignored ones as zeros would
    silently shrink every padded example's loss and gradient.

    Raises:
        ValueError: If so (not checked inside ``torch.func.vmap``: the probe forward outside
            it, at the measurement's first step, has checked).
    """
    if not _class_index(targets) or (ignored := _ignored(loss_fn)) is None:
        return
    assert isinstance(targets, torch.Tensor)
    if torch._C._functorch.is_batchedtensor(targets):
        return
    if bool((targets == ignored[0]).any()):
        raise ValueError(
            f"the loss returns per-element losses of shape {tuple(shape)}, which do not line up "
            f"with the targets of shape {tuple(targets.shape)}, and the targets mark ignored "
            f"positions ({ignored[0]}): which losses each example's mean leaves out cannot be "
            "told. Give the probe targets lined up with the losses (for a causal LM whose loss "
            "shifts the labels: the labels already shifted, labels[:, 1:], and a loss that "
            "does not shift them)"
        )


def class_dim(shape: tuple[int, ...], target_shape: tuple[int, ...]) -> int | None:
    """The dimension of outputs of ``shape`` that holds the classes of class-index targets of
    ``target_shape``: -1 where the targets are the outputs' shape without the last, 1 for
    (N, C, d1, ...) outputs and (N, d1, ...) targets, None where they do not line up."""
    if shape and shape[:-1] == target_shape:
        return -1
    if len(shape) >= 3 and target_shape == (shape[0], *shape[2:]):
        return 1
    return None


def _check_ignore_index(
    loss_fn: LossFn, outputs: Any, targets: Batch, losses: torch.Tensor
) -> None:
    """Refuse a plain callable that leaves out targets other than the ignore index assumed for
    it (:func:`callable_ignore_index`; :func:`~.hidden_ignore.refuse_hidden_ignore` on its
    per-element losses of class-index targets).

    Raises:
        ValueError: If so (not checked inside ``torch.func.vmap``, like
            :func:`_check_lined_up`).
    """
    fn = inner_loss(loss_fn)
    if isinstance(fn, nn.CrossEntropyLoss | nn.NLLLoss) or (ignored := _ignored(loss_fn)) is None:
        return
    if not (_class_index(targets) and isinstance(outputs, torch.Tensor)):
        return
    assert isinstance(targets, torch.Tensor)
    if losses.shape != targets.shape or outputs.dim() != targets.dim() + 1:
        return
    batched = torch._C._functorch.is_batchedtensor
    if batched(targets) or batched(losses) or batched(outputs):
        return
    shape = tuple(outputs.shape)
    dim = class_dim(shape, tuple(targets.shape))
    classes = shape[dim] if dim is not None else 0
    if classes < 2 or dim is None:
        return
    refuse_hidden_ignore(outputs, targets, losses, dim, classes, ignored[0])


def _counted(loss_fn: LossFn, targets: Batch, shape: torch.Size) -> torch.Tensor | None:
    """Each element's weight in a mean-reduced class-index loss (0 where the target is ignored),
    shaped like the losses; None when every element counts alike (not class-index targets)."""
    if not isinstance(targets, torch.Tensor) or targets.shape != shape:
        return None
    if not _class_index(targets) or (ignored := _ignored(loss_fn)) is None:
        return None
    ignore, weight = ignored
    valid = targets != ignore  # no data-dependent branch: this runs under torch.func.vmap too
    if weight is None:
        return valid
    w = weight.to(targets.device)[targets.clamp(0, weight.shape[0] - 1)]
    return torch.where(valid, w, torch.zeros_like(w))
