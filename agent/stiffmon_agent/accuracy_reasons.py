"""Why a step has no accuracy, in words a user can act on.

* :func:`not_one_tensor`: logits or targets that are not one tensor each (CTC target tuples,
  batch dicts, numpy arrays, None);
* :func:`check_comparable`: tensors whose shapes do not compare (the class dimension else);
* :func:`nan_accuracy_console`, :func:`nan_accuracy_event`: the console line and the
  ``accuracy-unavailable`` event's message for such a reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from stiffmon_agent.metrics.probe import class_dim


def check_comparable(logits: Any, targets: Any, threshold: float | None = None) -> int:
    """The logits' class dimension, for the argmax; raise unless the shapes compare.

    There must be one target per prediction (no broadcasting: targets of shape (B, 1) against
    (B, C) logits would compare every prediction with every target) and at least two classes (a
    binary classifier's one logit per example, shape (B,) or (B, 1), has no argmax). The classes
    are last where ``logits.shape[:-1] == targets.shape``, else in dimension 1 where the logits
    have three or more dimensions and ``targets.shape == (N, d1, ...)`` for (N, C, d1, ...)
    logits (``CrossEntropyLoss``'s segmentation layout); a shape that fits both is read classes
    last for 3-D logits ((N, T, T) with (N, T): a sequence model's) and in dimension 1 for 4-D
    and more ((N, C, H, W) with C = H = W: channels first, as torch's losses and layers read
    images). With a binary loss's ``threshold``: one target per output, the same shape.

    Args:
        logits: The model outputs (anything with ``shape`` and ``ndim``).
        targets: The targets.
        threshold: A binary loss's decision threshold, or None (argmax accuracy).

    Returns:
        -1 (classes last) or 1 (classes in dimension 1); -1 with a ``threshold``.

    Raises:
        ValueError: The shapes do not compare, or the logits are integers (predicted classes,
            not scores); the message says why.
    """
    shape, target_shape = tuple(logits.shape), tuple(targets.shape)
    if threshold is not None:
        if shape != target_shape:
            raise ValueError(
                f"outputs {shape} and targets {target_shape} of a binary "
                "loss do not compare (need one 0/1 target per output, the same shape)"
            )
        return -1
    dtype = getattr(logits, "dtype", None)
    if isinstance(dtype, torch.dtype) and not (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(
            f"the logits are {str(dtype).removeprefix('torch.')} (predicted classes?), not "
            "class scores: pass the model's scores, before any argmax, as logits="
        )
    if (found := class_dim(shape, target_shape)) is not None:
        dim = found
        if len(shape) >= 4 and target_shape == (shape[0], *shape[2:]):
            dim = 1  # (N, C, H, W) with C = H = W fits both: torch's layout, as the loss reads it
    elif not shape or shape[-1] < 2:
        dim = -1  # said below, as before the layouts were told apart
    elif shape == target_shape:
        raise ValueError(f"logits and targets have the same shape {shape} {_same_shape(targets)}")
    else:
        raise ValueError(
            f"logits {shape} and targets {target_shape} do not compare (need targets of the "
            "logits' shape without the class dimension, the last or, for (N, C, d1, ...) "
            "logits, dimension 1)"
        )
    if not shape or shape[dim] < 2:
        if shape == target_shape and _targets_kind(targets) == "regression":
            raise ValueError(
                f"logits {shape} have no class dimension of two or more classes and the "
                f"targets are real values (a regression's): {NO_REGRESSION_ACCURACY}"
            )
        raise ValueError(
            f"logits {shape} have no class dimension of two or more classes "
            "(a binary classifier's single logit has no argmax accuracy)"
        )
    return dim


NO_REGRESSION_ACCURACY = (
    "accuracy does not apply to a regression loss (MSELoss, L1Loss, HuberLoss, SmoothL1Loss, "
    "PoissonNLLLoss, GaussianNLLLoss, ...): call agent.step(loss) without logits and targets, "
    "which also ends this warning"
)
"""The way out for a regression's outputs and targets passed to ``step()``."""

READ_MAX = 8192
"""Targets of at most this many elements, on the CPU, are read to tell regression targets from
probabilities (where the shapes say no accuracy, at most once per batch of steps)."""


def _same_shape(targets: Any) -> str:
    """What to say after "logits and targets have the same shape …": soft class targets (their
    argmax is the class), a regression's real-valued targets (no accuracy at all), or, where the
    values are not read (a GPU's, big ones), both."""
    kind = _targets_kind(targets)
    if kind == "regression":
        return (
            "and the targets are real values, not class indices or probabilities (some "
            f"outside [0, 1]: a regression's): {NO_REGRESSION_ACCURACY}"
        )
    soft = "for soft targets, pass their argmax over the classes as targets="
    if kind != "probabilities":  # not read: either way out
        soft += f"; {NO_REGRESSION_ACCURACY}"
    return (
        "(probability targets, a binary classifier's or a regression's outputs): no "
        f"class-index accuracy ({soft})"
    )


def _targets_kind(targets: Any) -> str | None:
    """``"regression"`` for floating-point targets with a value outside [0, 1],
    ``"probabilities"`` for ones in [0, 1] summing to 1 over the last dimension or, for
    (N, C, d1, ...) targets (soft segmentation masks, classes in dimension 1 as
    ``CrossEntropyLoss`` reads them), over dimension 1; None where
    neither is known (other values, integer targets, targets not read: on a GPU, more than
    :data:`READ_MAX` elements)."""
    if not isinstance(targets, torch.Tensor) or not targets.is_floating_point():
        return None
    if targets.device.type != "cpu" or targets.numel() > READ_MAX or targets.ndim < 1:
        return None
    try:
        t = targets.detach().double()
        if not bool(torch.isfinite(t).all()):
            return None
        if bool(((t < 0) | (t > 1)).any()):
            return "regression"
        for dim in (-1, 1) if t.ndim >= 3 else (-1,):
            if t.shape[dim] > 1 and bool(((t.sum(dim) - 1).abs() <= 1e-3).all()):
                return "probabilities"
    except Exception:  # a tensor that cannot be read here (fake, batched)
        return None
    return None


TARGET_KEYS = ("targets", "target", "labels", "label", "y")
"""Keys of a mapping of targets (a batch dict) under which the class indices usually are."""


def not_one_tensor(logits: Any, targets: Any, threshold: float | None = None) -> str | None:
    """Why no accuracy can be computed from ``logits`` and ``targets`` that are not one tensor
    each (a tuple of CTC targets, a batch dict, a model's output dict, a numpy array, None), in
    words a user can act on; None when both are tensors (their shapes are checked later:
    :func:`check_comparable`).

    Args:
        logits: What was passed as the step's logits.
        targets: What was passed as its targets.
        threshold: A binary loss's decision threshold (0/1 targets), or None (class indices).

    Returns:
        The reason, or None.
    """
    if threshold is None:
        want = {"logits": "one tensor of class scores", "targets": "one class-index tensor"}
        what = {"logits": "the class scores", "targets": "the class indices"}
    else:
        want = {"logits": "one tensor of outputs", "targets": "one 0/1 tensor"}
        what = {"logits": "the outputs", "targets": "the 0/1 targets"}
    for name, value, other in (("logits", logits, "targets"), ("targets", targets, "logits")):
        if isinstance(value, torch.Tensor):
            continue
        if value is None:
            return (
                f"no {name} were given ({name}=None): pass {what[name]} as {name}=, "
                f"or leave {other} out too"
            )
        if isinstance(value, np.ndarray):
            return (
                f"the {name} are a numpy array {tuple(value.shape)}, not a torch tensor: "
                f"pass torch.as_tensor({name}) as {name}="
            )
        per = " per prediction" if name == "targets" else ""
        keys = ("logits",) if name == "logits" else TARGET_KEYS
        key = None
        if isinstance(value, Mapping):
            key = next((k for k in keys if isinstance(value.get(k), torch.Tensor)), None)
        if key is not None:
            hint = f"pass its {key!r} entry as {name}="
        else:
            hint = f"pass {name}= {what[name]}"
        return (
            f"the {name} are {_described(value)}, not {want[name]}{per}: {hint}, "
            "or leave logits/targets out"
        )
    return None


def _described(value: Any) -> str:
    """What a non-tensor is, in a few words: ``a tuple of 3 tensors``, ``a dict with keys
    'labels', 'mask'``, ``a float``."""
    name = type(value).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    if isinstance(value, Mapping):
        keys = [repr(k) for k in list(value)[:4]]
        if not keys:
            return f"an empty {name}"
        more = ", …" if len(value) > 4 else ""
        return f"{article} {name} with keys {', '.join(keys)}{more}"
    if isinstance(value, tuple | list):
        n = len(value)
        tensors = n and all(isinstance(v, torch.Tensor) for v in value)
        kind = ("tensor" if n == 1 else "tensors") if tensors else ("item" if n == 1 else "items")
        return f"{article} {name} of {n} {kind}"
    return f"{article} {name}"


def nan_accuracy_console(reason: str, *, seen: bool) -> str:
    """The console line for a reason the accuracy is NaN: unavailable for the run while no
    step had one (``seen`` false), else NaN at some steps."""
    if seen:
        return f"stiffmon: no accuracy for some steps (NaN): {reason}"
    return f"stiffmon: accuracy unavailable for this run (NaN from the first step on): {reason}"


def nan_accuracy_event(reason: str, step: int, *, seen: bool, first_step: int | None = None) -> str:
    """The ``accuracy-unavailable`` event's message for a reason a batch's accuracy is NaN.

    Args:
        reason: Why (a :class:`ValueError`'s text: :func:`check_comparable`,
            :func:`not_one_tensor`).
        step: The last step of the batch that said it.
        seen: Whether some step's accuracy was a number before (then: NaN at some steps).
        first_step: The first step that had logits and targets, if known (a resumed run's is
            not 0); without it a batch ending at step 0 is the first step.

    Returns:
        E.g. ``accuracy is unavailable for this run: NaN at its first step (step 0): …``, ``…:
        NaN at every step so far (steps 0 to 12): …``, ``accuracy is NaN at some steps of the
        batch up to step 40: …``.
    """
    if seen:
        return f"accuracy is NaN at some steps of the batch up to step {step}: {reason}"
    first = 0 if first_step is None and step == 0 else first_step
    if first is not None and step <= first:
        where = f"NaN at its first step (step {step})"
    elif first is not None:
        where = f"NaN at every step so far (steps {first} to {step})"
    else:
        where = f"NaN at every step so far (up to step {step})"
    return f"accuracy is unavailable for this run: {where}: {reason}"
