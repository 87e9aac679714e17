"""The fixed probe and its hygiene: building it from the user's examples, checking it is usable.

* :class:`ProbeSet`: the joint train (+ optional validation) probe, with its class labels;
* :func:`make_probe`: concatenate, move to the model's device and dtype, read the labels;
* :func:`count_weighted`: the loss whose per-example losses make the objective the optimizer
  steps on where a mean-reduced class-index loss divides by the batch's count of counted
  positions (padded tokens, class weights);
* :func:`ascended`: the loss an optimizer with ``maximize=True`` descends (its negative);
* :func:`objective_loss`: both, the loss the agent measures with;
* :class:`MeasurementSkipped`: a due measurement not taken
  (:func:`~stiffmon_agent.probe_check.check_finite`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from stiffmon_agent.class_target import ClassTarget, class_labels_of
from stiffmon_agent.metrics.probe import (
    Batch,
    LossFn,
    PerExampleLoss,
    batch_size,
    class_weights_of,
    counted_examples,
    counted_weights,
    ignore_index_of,
    loss_reduction,
    take,
    unreduced,
)
from stiffmon_agent.metrics.thresholds import maximizes


@dataclass(frozen=True)
class ProbeSet:
    """The fixed probe: train part first, then the optional validation part.

    Attributes:
        inputs: Joint inputs (train ∪ val), examples along dim 0.
        targets: Joint targets.
        n_train: Number of train examples (the first ``n_train``).
        labels: Integer class labels (N,) if the targets are class labels (integers of shape
            (N,), or a binary classifier's 0/1 floats of shape (N,) or (N, 1)), else None.
        num_classes: Number of classes (when ``labels`` is set).
        class_names: Names of the classes, if known.
        val_left_out: Examples of the validation probe left out because the probe has no class
            labels (:func:`without_unused_val`); 0 if none.
    """

    inputs: Batch
    targets: Batch
    n_train: int
    labels: Tensor | None
    num_classes: int
    class_names: tuple[str, ...]
    val_left_out: int = 0

    @property
    def n(self) -> int:
        return batch_size(self.targets)

    def train(self) -> tuple[Batch, Batch]:
        sl = slice(0, self.n_train)
        return take(self.inputs, sl), take(self.targets, sl)


def make_probe(
    train: tuple[Batch, Batch],
    val: tuple[Batch, Batch] | None,
    device: torch.device | None,
    num_classes: int | None,
    class_names: Sequence[str] | None,
    dtype: torch.dtype | None = None,
    ignore_index: int | None = None,
    class_target: ClassTarget = None,
) -> ProbeSet:
    """Concatenate the train and val probes, move them to ``device`` and read the labels.

    Floating-point tensors are cast to ``dtype`` (the model's), so a float64 probe works with
    a float32 model. Integer class labels that are not 0..K−1 (e.g. {10, 20, 30}) are mapped to
    compact classes named after the original labels, unless ``class_names`` or ``num_classes``
    say how to read them. A binary classifier's 0/1 float targets are classes 0 and 1. Examples
    whose target is the loss's ``ignore_index`` are no class (:func:`without_uncounted` leaves
    them out of the probe). ``class_target`` names the part of structured targets that holds
    the class indices (:mod:`~stiffmon_agent.class_target`).

    Raises:
        ValueError: If a probe is empty or malformed, or ``class_target`` names no class
            indices.
    """

    def move(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device)

    for name, pair in (("probe", train), ("val_probe", val)):
        if pair is not None and not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise TypeError(
                f"{name} must be an (inputs, targets) pair of tensors (or tuples / dicts of "
                f"tensors), not {type(pair).__name__}; from a DataLoader take fixed examples, "
                "e.g. next(iter(loader)) with shuffling off"
            )
    xs, ys = tree_map(move, train[0]), tree_map(move, train[1])
    n_train = batch_size(ys)
    if n_train == 0 or batch_size(xs) != n_train:
        raise ValueError(
            f"the probe needs at least one example and as many inputs as targets "
            f"(got {batch_size(xs)} inputs, {n_train} targets)"
        )
    if val is not None:
        vx, vy = tree_map(move, val[0]), tree_map(move, val[1])
        if batch_size(vy) == 0 or batch_size(vx) != batch_size(vy):
            raise ValueError("the validation probe is empty or has mismatched inputs and targets")
        xs = tree_map(lambda a, b: torch.cat([a, b]), xs, vx)
        ys = tree_map(lambda a, b: torch.cat([a, b]), ys, vy)
    labels, binary = class_labels_of(ys, class_target, batch_size(ys))
    names = tuple(class_names or ())
    k = num_classes or (len(names) if names else 0)
    if labels is not None and binary:  # a binary classifier's 0/1: classes 0 and 1
        k = max(k, 2)
    elif labels is not None and labels.numel():
        ignored = labels == ignore_index if ignore_index is not None else None
        if ignored is not None and bool(ignored.all()):
            return ProbeSet(xs, ys, n_train, labels, k, names)  # without_uncounted refuses it
        if ignored is not None and bool(ignored.any()):
            labels = torch.where(ignored, labels[~ignored][0], labels)  # any class: left out
        uniq = torch.unique(labels)
        compact = int(uniq[0]) == 0 and int(uniq[-1]) == uniq.numel() - 1
        if not names and not num_classes and not compact:
            names = tuple(str(int(v)) for v in uniq)
            labels = torch.searchsorted(uniq, labels)
            k = uniq.numel()
        else:
            if int(uniq[0]) < 0:
                raise ValueError(f"negative class label {int(uniq[0])} in the probe")
            k = max(k, int(labels.max()) + 1)
    return ProbeSet(xs, ys, n_train, labels, k, names)


def build_probe(
    model: nn.Module,
    loss_fn: LossFn,
    train: tuple[Batch, Batch],
    val: tuple[Batch, Batch] | None,
    num_classes: int | None,
    class_names: Sequence[str] | None,
    class_target: ClassTarget = None,
) -> tuple[ProbeSet, str]:
    """The agent's probe: :func:`make_probe` on the model's device and floating dtype, with
    the loss's ignore index and ``class_target``, then :func:`without_unused_val` and
    :func:`without_uncounted` (the probe, and what the latter left out)."""
    device = next((q.device for q in model.parameters()), None)
    dtype = next((q.dtype for q in model.parameters() if q.is_floating_point()), None)
    ignore = ignore_index_of(loss_fn)
    probe = make_probe(train, val, device, num_classes, class_names, dtype, ignore, class_target)
    return without_uncounted(without_unused_val(probe), loss_fn)


def without_unused_val(probe: ProbeSet) -> ProbeSet:
    """``probe`` without its validation examples when it has no class labels.

    Validation examples enter only the train–val and val–val class stiffness; every other
    measurement is of the train probe. Without class labels their per-example gradients would
    be computed at every Gram for nothing: :attr:`ProbeSet.val_left_out` counts them instead.
    """
    left = probe.n - probe.n_train
    if probe.labels is not None or left <= 0:
        return probe
    x, y = probe.train()
    return ProbeSet(x, y, probe.n_train, None, probe.num_classes, probe.class_names, left)


def without_uncounted(probe: ProbeSet, loss_fn: LossFn) -> tuple[ProbeSet, str]:
    """``probe`` without the examples that have no counted target (every position the loss's
    ``ignore_index``, e.g. a fully masked prompt): their mean loss over counted positions is
    0/0, and kept as a zero-gradient example it would dilute every probe mean. Also a
    description of what was left out ("" if nothing).

    Raises:
        ValueError: If no example of the train probe has a counted target.
    """
    keep = counted_examples(loss_fn, probe.targets)
    if keep is None or bool(keep.all()):
        return probe, ""
    keep = keep.cpu()
    gone = [int(i) for i in torch.nonzero(~keep).reshape(-1)]
    n_train = int(keep[: probe.n_train].sum())
    if n_train == 0:
        raise ValueError(
            "no example of the train probe has a counted target (every target is the loss's "
            "ignore_index): nothing to measure"
        )
    where = ", ".join(
        f"{i} (train)" if i < probe.n_train else f"{i - probe.n_train} (val)" for i in gone[:10]
    )
    more = f" and {len(gone) - 10} more" if len(gone) > 10 else ""
    note = (
        f"probe examples {where}{more} have no counted target (every target is the loss's "
        f"ignore_index): left out of the probe, which measures {n_train} train and "
        f"{int(keep.sum()) - n_train} val examples"
    )
    index = torch.nonzero(keep).reshape(-1)
    labels = probe.labels
    kept = ProbeSet(
        take(probe.inputs, _on_device(index, probe.inputs)),
        take(probe.targets, _on_device(index, probe.targets)),
        n_train,
        labels[_on_device(index, labels)] if labels is not None else None,
        probe.num_classes,
        probe.class_names,
        probe.val_left_out,
    )
    return kept, note


@dataclass(frozen=True)
class CountWeighting:
    """How :func:`count_weighted` normalises the per-example losses.

    Attributes:
        mean: c̄ = (1/N) Σ_i Σ_t c_it over the N train examples (for one target per example: the
            mean class weight w̄).
        low: The smallest count Σ_t c_it of one train example.
        high: The largest.
        per_element: Targets per element ((B, T) tokens, pixels); False: one target per example.
        class_weights: The loss has a class ``weight`` (the counts are weighted).
    """

    mean: float
    low: float
    high: float
    per_element: bool
    class_weights: bool

    @staticmethod
    def of(counts: Tensor, per_element: bool, class_weights: bool) -> CountWeighting:
        """From the counts Σ_t c_it of the N examples the probe keeps: their mean, and the
        smallest and largest of those that count anything."""
        kept = counts[counts > 0]
        lo, hi = float(kept.min()), float(kept.max())
        return CountWeighting(float(counts.mean()), lo, hi, per_element, class_weights)


def count_weighted(
    loss_fn: LossFn, targets: Batch, say: Callable[[CountWeighting], None] | None = None
) -> tuple[LossFn, CountWeighting | None]:
    """The loss to measure with where a mean-reduced class-index loss divides by the batch's
    count of counted positions.

    A mean-reduced ``CrossEntropyLoss`` / ``NLLLoss`` (or a plain callable, ignore index -100)
    trains on Σ_{i,t} c_it ℓ_it / Σ_{i,t} c_it, c_it the weight of position t of example i (0
    where ignored, its class ``weight``, else 1; :mod:`~stiffmon_agent.metrics.probe`). With
    c̄ = (1/N) Σ_i Σ_t c_it over ``targets`` (the probe's train examples; examples counting
    nothing are left out of the probe, and of N, by :func:`without_uncounted`), L_i =
    Σ_t c_it ℓ_it / c̄ makes (1/N) Σ_i L_i that objective on these examples, so that the Hessian
    of the probe mean and the per-example gradients g_i = ∇L_i are those of the loss the
    optimizer steps on. Against each example's own mean, L_i is scaled by (Σ_t c_it) / c̄: λ1_H,
    Tr K and the gradient noise change, cosines and sign stiffness do not. The same c̄ scales
    the validation examples: their gradients enter only the train-val and val-val stiffness
    (cosines and signs), which no positive per-example scale changes, so their own c̄ would
    give the same numbers. Every rank of a sharded measurement builds the same global probe,
    hence the same c̄.

    ``say`` is called with the :class:`CountWeighting` the first time c̄ applies (the losses
    are read: at the first measurement); never where the losses do not line up with the
    targets (a loss returning one value per example, each its own mean, is used as it is).

    Returns:
        ``(PerExampleLoss with count_mean c̄, CountWeighting)``; ``(loss_fn, None)`` where
        nothing changes: a sum-reduced loss (L_i = Σ_t c_it ℓ_it already), targets that are not
        class indices (every element counts alike: regression, soft targets,
        ``KLDivLoss(reduction="batchmean")``), per-element targets whose examples all count
        alike (c̄ = each one's own count), one target per example without class weights.

    Raises:
        ValueError: If no train target counts (every class weight 0).
    """
    totals = counted_weights(loss_fn, targets)
    if totals is None or loss_reduction(loss_fn) != "mean":
        return loss_fn, None
    assert isinstance(targets, Tensor)
    per_element = targets.dim() > 1
    weights = class_weights_of(loss_fn) is not None
    totals = totals.detach().double().cpu()
    kept = totals[totals > 0]
    alike = per_element and bool((totals == totals[:1]).all())  # each own count is c̄
    if not (per_element or weights) or alike:
        return loss_fn, None
    if not kept.numel():
        raise ValueError(
            "the class weights of the probe's train examples are all 0: the weighted loss has "
            "no gradient on the probe; give a probe with examples of weighted classes"
        )
    info = CountWeighting.of(kept, per_element, weights)
    base = unreduced(loss_fn)
    measured = PerExampleLoss(base.fn, base.objective, base.elements, base.scale, info.mean)
    if say is not None:
        tell: Callable[[CountWeighting], None] = say
        measured.on_count = lambda applied: tell(info) if applied else None
    return measured, info


def ascended(loss_fn: LossFn) -> PerExampleLoss:
    """The objective of an optimizer with ``maximize=True``: L_i ↦ −L_i.

    Gradient ascent on f is descent on −f, so the Hessian whose top eigenvalue meets the
    optimizer's stability threshold is that of −f (−λ_min(H_f) for λ1); the per-example
    gradients change sign, so cosines, the Gram's noise figures and the gradient tests do not
    change.
    """
    base = unreduced(loss_fn)
    out = PerExampleLoss(base.fn, base.objective, base.elements, -base.scale, base.count_mean)
    out.on_count = base.on_count
    return out


def objective_loss(
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer | None,
    targets: Batch,
    say: Callable[[CountWeighting], None] | None = None,
) -> LossFn:
    """The loss to measure with: the per-example contributions to the objective the optimizer
    descends (:func:`ascended` for ``maximize=True``, then :func:`count_weighted` over the train
    probe's ``targets``, telling ``say``)."""
    if maximizes(optimizer):
        loss_fn = ascended(loss_fn)
    return count_weighted(loss_fn, targets, say)[0]


def _on_device(index: Tensor, batch: Batch) -> Tensor:
    """``index`` on the device of ``batch``'s first tensor (index and data must share one)."""
    for leaf in tree_leaves(batch):
        if isinstance(leaf, Tensor):
            return index.to(leaf.device)
    return index


class MeasurementSkipped(Exception):
    """A due measurement was not taken (non-finite weights or probe loss); the message says why."""
