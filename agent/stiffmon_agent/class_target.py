"""The class labels of a probe: which part of its targets holds the class indices.

Class stiffness C[a, b] (the mean stiffness of the pairs i ∈ a, j ∈ b, i ≠ j) needs one class
index y_i per probe example. A probe whose targets are one tensor of class indices (or a
binary classifier's 0/1) gives them itself (:func:`read_class_labels`); structured targets
(a dict ``{"label": ..., "bbox": ...}``, a multi-task tuple) say where they are with
``class_target=``:

* a key (``str``) of dict targets, ``class_target="label"``;
* an index (``int``) of tuple / list targets, ``class_target=0``;
* a callable ``targets -> (N,)`` integer tensor of class indices, given the probe's whole
  targets (train ∪ val), e.g. ``lambda y: y["label"]`` or ``lambda y: y.argmax(1)`` for
  one-hot or soft targets.

The selection only names the classes: the loss still gets the whole targets. A selection that
does not exist or is not class indices raises :class:`ValueError` where the probe is built
(the agent's construction), never at a measurement; without ``class_target`` a probe with no
class labels gets an info event (:func:`no_class_note`) that says why and names the option.
Targets that are not one class per example are named for what they are (:func:`soft_reason`):
one-hot or label-smoothed rows, whose argmax is the class (the event names the callable, the
agent does not group by it unasked); mixup / CutMix / teacher probability rows, multi-label 0/1
rows and per-pixel class indices, which give an example no one class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from stiffmon_agent.metrics.probe import Batch

ClassTarget: TypeAlias = str | int | Callable[[Any], Tensor] | None
"""A key of dict targets, an index of tuple targets, or a callable targets -> class indices."""

NEEDED = "integers of shape (N,), or a binary classifier's 0/1"
GO_ON = "layer stiffness, gradient noise and sharpness go on"


def check_class_target(class_target: Any) -> None:
    """Refuse a ``class_target`` that is neither None, a str, an int nor a callable.

    Raises:
        TypeError: If so (a bool is not an index).
    """
    if class_target is None or callable(class_target):
        return
    if isinstance(class_target, bool) or not isinstance(class_target, str | int):
        raise TypeError(
            "class_target must be a key of dict targets (str), an index of tuple targets (int) "
            f"or a callable targets -> class indices, not {type(class_target).__name__}"
        )


def described(class_target: ClassTarget) -> str:
    """``class_target=…`` as the user wrote it (a callable by its name)."""
    if callable(class_target):
        return f"class_target={getattr(class_target, '__name__', type(class_target).__name__)}"
    return f"class_target={class_target!r}"


def select_class_target(targets: Batch, class_target: ClassTarget) -> Any:
    """The part of ``targets`` that ``class_target`` names (``targets`` itself for None).

    Raises:
        ValueError: A key that the dict targets lack, an index out of the tuple's range, a
            key or index for targets of another kind, or a callable that fails.
        TypeError: A ``class_target`` of another type (:func:`check_class_target`).
    """
    check_class_target(class_target)
    if class_target is None:
        return targets
    name = described(class_target)
    if callable(class_target):
        try:
            return class_target(targets)
        except Exception as exc:
            raise ValueError(
                f"{name} failed on the probe's targets ({kind_of(targets)}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    if isinstance(class_target, str):
        if not isinstance(targets, Mapping):
            raise ValueError(
                f"{name} is a key, but the probe's targets are {kind_of(targets)}, not a dict"
                + _hint(targets)
            )
        if class_target not in targets:
            raise ValueError(
                f"{name} is not a key of the probe's targets ({kind_of(targets)})" + _hint(targets)
            )
        return targets[class_target]
    if not isinstance(targets, tuple | list):
        raise ValueError(
            f"{name} is an index, but the probe's targets are {kind_of(targets)}, not a tuple"
            + _hint(targets)
        )
    if not -len(targets) <= class_target < len(targets):
        raise ValueError(
            f"{name} is out of range for the probe's targets ({kind_of(targets)})" + _hint(targets)
        )
    return targets[class_target]


def class_labels_of(
    targets: Batch, class_target: ClassTarget, n: int
) -> tuple[Tensor | None, bool]:
    """The (N,) class labels of probe ``targets`` of ``n`` examples (:func:`read_class_labels`
    of the part :func:`select_class_target` names), None without ``class_target`` when the
    targets are not class labels; and whether they are a binary classifier's 0/1 floats (read
    as classes 0 and 1, whatever the class names say).

    Raises:
        ValueError: If ``class_target`` names nothing, or a part that is not ``n`` class labels
            (:data:`NEEDED`).
    """
    chosen = select_class_target(targets, class_target)
    labels = read_class_labels(chosen)
    binary = labels is not None and isinstance(chosen, Tensor) and chosen.is_floating_point()
    if class_target is None:
        return labels, binary
    if labels is None or labels.shape[0] != n:
        raise ValueError(
            f"{described(class_target)} selects {kind_of(chosen)}, not the class indices of the "
            f"probe's {n} examples ({NEEDED})"
        )
    return labels, binary


def read_class_labels(ys: Any) -> Tensor | None:
    """Integer targets (N,), or the 0/1 float targets (N,) or (N, 1) of a binary classifier
    (``BCEWithLogitsLoss``) read as classes 0 and 1; else None (soft, multi-label, regression,
    structured targets)."""
    if not isinstance(ys, Tensor) or ys.dim() not in (1, 2):
        return None
    if not ys.is_floating_point():
        return ys if ys.dim() == 1 else None
    if ys.dim() == 2 and ys.shape[1] != 1:
        return None
    flat = ys.reshape(-1)
    if flat.numel() and bool(((flat == 0) | (flat == 1)).all()):
        return flat.long()
    return None


def no_class_note(targets: Batch, val_left_out: int = 0) -> str:
    """The info event's text for a probe without class labels: why, and the ``class_target=``
    that would give them (a key or index whose part reads as class labels, where one does).

    A tensor of targets that are not one class per example is named for what it is
    (:func:`soft_reason`): one-hot or label-smoothed rows (the argmax is the class: the callable
    to pass), probability rows that differ per example (mixup, CutMix, a teacher's: no class),
    multi-label 0/1 rows, soft binary targets, per-pixel or per-token class indices. With
    ``val_left_out`` > 0 it adds that the validation probe's examples are not measured (train–val
    and val–val stiffness are per class pair; nothing else uses them)."""
    what = f"no class stiffness: the probe's targets are {kind_of(targets)}, not class labels"
    if isinstance(targets, Mapping):
        fit = [k for k, v in targets.items() if read_class_labels(v) is not None]
        pick = repr(fit[0]) if fit else "'<key>'"
        how = f"class_target={pick} (the key holding the class indices) for it"
        if len(fit) > 1:
            how = _several(", ".join(map(repr, fit)), "keys")
    elif isinstance(targets, tuple | list):
        fit = [i for i, v in enumerate(targets) if read_class_labels(v) is not None]
        how = f"class_target={fit[0] if fit else '<index>'} (the index of the class indices) for it"
        if len(fit) > 1:
            how = _several(", ".join(map(str, fit)), "indices")
    elif (soft := soft_reason(targets)) is not None:
        why, how = soft
        return f"{what} ({NEEDED}); {why}; {how}; {GO_ON}{_val_note(val_left_out)}"
    else:
        how = (
            "class_target= a callable targets -> (N,) class indices if each example has a class "
            "(e.g. lambda y: y.argmax(1) for one-hot targets)"
        )
    return f"{what} ({NEEDED}); pass Agent {how}; {GO_ON}{_val_note(val_left_out)}"


def _several(which: str, kind: str) -> str:
    """The hint where several parts of structured targets hold class indices."""
    return (
        f"class_target= one of the {kind} {which} (each holds class indices: pass the one "
        "each example belongs to; for mixup's (y_a, y_b, λ) none: a mixed example belongs to "
        "no one class, so give the probe unmixed examples)"
    )


def _val_note(val_left_out: int) -> str:
    """What the event adds when the validation probe is left out for want of class labels."""
    if val_left_out <= 0:
        return ""
    return (
        f"; the val probe's {val_left_out} examples are left out (not measured): train–val and "
        "val–val stiffness are per class pair and nothing else uses them (with class_target= "
        "they are measured)"
    )


ARGMAX = "class_target= a callable targets -> (N,) class indices, lambda y: y.argmax(1)"
"""The hint for probability rows whose argmax is the class."""


def soft_reason(ys: Any) -> tuple[str, str] | None:
    """Why a tensor of targets gives no class per example, and what to pass; None for kinds
    it does not name (regression values, class labels).

    For float rows y_i ∈ ℝ^C (C ≥ 2), with p_i = max_c y_ic:

    * 0/1 rows with one 1 each: one-hot, the class is the argmax;
    * 0/1 rows otherwise: multi-label (an example may have several classes, or none);
    * rows on the simplex (y_ic ≥ 0, Σ_c y_ic = 1) that are one vector up to a permutation of
      the classes with a unique largest entry: one-hot with label smoothing (p on one class,
      (1 − p)/(C − 1) on each other), the class is the argmax;
    * other rows on the simplex (mixup, CutMix, a teacher's probabilities): the mass lies on
      several classes in proportions that differ per example, so no class is the example's;
      the hint gives their range of p_i and how many have no majority (p_i ≤ 1/2).

    Float targets (N,) or (N, 1) in [0, 1] that are not all 0/1 are a binary classifier's soft
    targets; integer targets with more than one dimension are per-element class indices
    (pixels, tokens).
    """
    if not isinstance(ys, Tensor) or ys.dim() == 0 or not ys.numel():
        return None
    n = ys.shape[0]
    if not ys.is_floating_point():
        if ys.dim() < 2 or ys.dtype == torch.bool or ys[0].numel() < 2:
            return None
        per = "×".join(map(str, ys.shape[1:]))
        return (
            f"per-element class indices ({per} per example: pixels or tokens), so an example "
            "holds many classes and belongs to no one class",
            "if each example has one (an image-level label), put it beside them, "
            "probe=(x, (masks, labels)) with a loss that unpacks the tuple, and pass Agent "
            "class_target=1, or class_target= a callable targets -> (N,) class indices",
        )
    y = ys.detach().double().cpu()
    if not bool(torch.isfinite(y).all()):
        return None
    if y.dim() == 1 or (y.dim() == 2 and y.shape[1] == 1):
        flat = y.reshape(-1)
        if bool(((flat >= 0) & (flat <= 1)).all()):
            tied = int((flat == 0.5).sum())
            return (
                "they are a binary classifier's soft targets (probabilities in [0, 1], not 0/1:"
                " label smoothing or a teacher's)",
                "pass Agent class_target=lambda y: (y.reshape(-1) > 0.5).long() to group each "
                f"example by its nearer class ({tied} of {n} at exactly 0.5)",
            )
        return None
    if y.dim() != 2:
        return None
    binary = bool(((y == 0) | (y == 1)).all())
    if binary:
        ones = y.sum(1)
        if bool((ones == 1).all()):
            return (
                "they are one-hot rows: each example's class is its argmax",
                f"pass Agent {ARGMAX}",
            )
        several, none = int((ones > 1).sum()), int((ones == 0).sum())
        return (
            f"they are multi-label 0/1 rows ({several} of {n} examples have several classes, "
            f"{none} none), so an example belongs to no one class",
            "if each example has one class all the same, pass Agent class_target= a callable "
            "targets -> (N,) class indices",
        )
    on_simplex = bool((y >= 0).all()) and bool(((y.sum(1) - 1).abs() <= 1e-6).all())
    if not on_simplex:
        return None
    rows = y.sort(1, descending=True).values
    top = rows[:, 0]
    alike = bool(((rows - rows[:1]).abs() <= 1e-9).all())
    if alike and float(rows[0, 0] - rows[0, 1]) > 1e-9:
        return (
            f"they are label-smoothed one-hot rows (each {float(rows[0, 0]):.4g} on one class, "
            f"{float(rows[0, 1]):.4g} on each other): each example's class is its argmax",
            f"pass Agent {ARGMAX}, to group by it",
        )
    lo, hi, split = float(top.min()), float(top.max()), int((top <= 0.5).sum())
    return (
        "they are probability rows that differ per example (mixup, CutMix or a teacher's: "
        f"largest probability {lo:.3g} to {hi:.3g}, {split} of {n} without a majority class), so "
        "an example with mass on several classes belongs to no one class",
        "a probe needs no mixing: give it unmixed examples and their class indices "
        "(CrossEntropyLoss takes either), or the hard labels beside the probabilities, "
        "probe=(x, (probs, labels)) with a loss that unpacks the tuple and Agent class_target=1;"
        " class_target=lambda y: y.argmax(1) would group each by its largest probability, "
        "a guess for a mixed example",
    )


def kind_of(value: Any) -> str:
    """A short description of a target: a tensor's dtype and shape, a dict's keys, a tuple's
    length and parts."""
    if isinstance(value, Tensor):
        return f"a {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')} tensor"
    if isinstance(value, Mapping):
        return f"a dict with keys {', '.join(map(repr, list(value)[:8]))}"
    if isinstance(value, tuple | list):
        parts = "; ".join(kind_of(v) for v in value[:4])
        return f"a {type(value).__name__} of {len(value)} ({parts})"
    return f"a {type(value).__name__}"


def _hint(targets: Batch) -> str:
    """What a ``class_target`` of these targets can be."""
    if isinstance(targets, Mapping):
        return f": give one of the keys {', '.join(map(repr, list(targets)[:8]))}, or a callable"
    if isinstance(targets, tuple | list):
        return f": give an index in 0..{len(targets) - 1}, or a callable"
    if any(isinstance(t, Tensor) for t in tree_leaves(targets)):
        return ": give a callable targets -> (N,) class indices, or leave class_target out"
    return ""
