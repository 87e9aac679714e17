"""Probe batches: slicing pytrees of tensors by example, the forward call and per-example losses.

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

import copy
import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeAlias

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from stiffmon_agent.metrics.hidden_ignore import refuse_hidden_ignore

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


class ForwardModule(nn.Module):
    """Wraps ``forward(model, inputs)`` as a module, so ``torch.func.functional_call`` can run a
    custom forward; the model's parameters appear under the prefix ``model.``."""

    def __init__(self, model: nn.Module, fn: ForwardFn) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, inputs: Batch) -> Any:
        return self.fn(self.model, inputs)
