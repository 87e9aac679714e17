"""A step's top-1 accuracy, without slowing the training loop or holding big logits.

The accuracy of a step is ``mean(argmax(logits, -1) == targets)`` over the targets ≥ 0: a
negative target (cross-entropy's ``ignore_index``, -100 by default: padding) is no prediction,
so it counts neither as a hit nor as a miss; a step with none is NaN. A non-negative
``ignore_index`` (255 in many segmentation sets) is a class like any other unless it is passed
as ``ignore_index`` (:func:`class_ignore_index` reads it off the loss). There must be one target
per prediction with at least two classes (no broadcasting; a binary classifier's single logit
has no argmax), classes last, ``targets.shape == logits.shape[:-1]``, or, as
``CrossEntropyLoss`` and ``NLLLoss`` read (N, C, d1, ...) inputs, classes in dimension 1 with
``targets.shape == (N, d1, ...)`` (segmentation); a shape that fits both, e.g. (N, T, T) logits
with (N, T) targets, is read classes last, but 4-D and more, (N, C, H, W) with C = H = W, in
dimension 1 (channels first, as torch's losses read images). Otherwise the step is NaN and a
warning ``event`` says why. With a binary loss (:func:`binary_threshold`: ``BCEWithLogitsLoss``
or ``BCELoss``) it is instead Keras' ``binary_accuracy``: ``mean((logits > t) == (targets > 0.5))``
over every element, with t = 0 for logits and 0.5 for probabilities, and targets of the logits'
shape ((B,), (B, 1), or (B, C) multi-label: the fraction of labels right). Where it is computed
matters:

* On the training thread every small kernel costs 10–20 µs in a real loop (caches cold after the
  step; measured on the digits CNN: argmax 17 µs, the whole count 31 µs, 1.5 % of a 2 ms step).
  So logits of at most :data:`DEFER_MAX_ELEMENTS` elements are only kept (detached), and the
  publisher thread counts the hits of a whole batch of steps in a few kernels.
* There the stacked logits must stay below torch's parallel grain (32,768 elements): above it a
  kernel starts a second OpenMP team on the publisher thread, which fights the training's own
  threads for the cores (measured: stacking 0.2 s of digits steps at once made the loop 2.1 ×
  slower). :func:`accuracies` stacks at most :data:`STACK_MAX_ELEMENTS` elements at a time,
  and counts in numpy (on the tensors' memory, single-threaded), torch only for bfloat16.
* Bigger logits (a language model's are the size of a layer per step), and logits on a GPU, are
  counted on the training thread, where those kernels are small beside the step (on a GPU they
  are queued on the training stream, in order, without synchronising; CUDA graphs may reuse the
  output buffer), and only the counts (hits, targets ≥ 0) are kept.

Kept tensors remember their version counter: a step whose logits or targets were changed in place
before the publisher thread got to them (a reused target buffer) is NaN, not a wrong number.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from stiffmon_agent.accuracy_reasons import check_comparable, nan_accuracy_console, not_one_tensor
from stiffmon_agent.gpu_readback import stacked_float64
from stiffmon_agent.metrics.probe import callable_ignore_index

log = logging.getLogger("stiffmon_agent")

DEFER_MAX_ELEMENTS = 8192
STACK_MAX_ELEMENTS = 32_768
_WARNED = "(accuracy)"  # keys of step_accuracy's ``warned``: never a custom scalar's name
_COUNTED = "(accuracy counted)"


class Accuracy:
    """One step's accuracy: kept logits (small) or a hit count (big); ``float()`` evaluates it.

    Attributes:
        logits: The detached logits, or None when counted already.
        targets: The targets, or None when counted already.
        hits: When counted: a tensor ``[correct predictions, targets ≥ 0]`` (None when kept).
        threshold: A binary loss's decision threshold (:func:`binary_threshold`), else None
            (argmax over the class dimension: :func:`check_comparable`).
        ignore: A non-negative target that is no prediction (a loss's ``ignore_index``), or
            None: only negative targets are.
        versions: The kept tensors' version counters when kept.
    """

    __slots__ = ("hits", "ignore", "logits", "targets", "threshold", "versions")

    def __init__(
        self,
        logits: Any,
        targets: Any,
        hits: Any = None,
        threshold: float | None = None,
        ignore: int | None = None,
    ) -> None:
        self.logits, self.targets, self.hits = logits, targets, hits
        self.threshold, self.ignore = threshold, ignore
        self.versions = (logits._version, targets._version) if hits is None else (0, 0)

    @property
    def intact(self) -> bool:
        """Whether kept tensors are as they were (always true once counted)."""
        if self.hits is not None:
            return True
        return (self.logits._version, self.targets._version) == self.versions

    @classmethod
    def of(
        cls,
        logits: torch.Tensor,
        targets: torch.Tensor,
        threshold: float | None = None,
        ignore_index: int | None = None,
    ) -> Accuracy:
        """On the training thread: keep small logits, count big ones.

        Args:
            logits: The step's model outputs.
            targets: Its targets (:func:`check_comparable`).
            threshold: A binary loss's decision threshold, or None (argmax accuracy).
            ignore_index: A non-negative target to leave out like the negative ones, or None.

        Returns:
            The kept tensors (checked on the publisher thread) or the counts.

        Raises:
            ValueError: Logits or targets that are not one tensor each (:func:`not_one_tensor`),
                or counted logits whose shapes do not compare with the targets'.
        """
        reason = not_one_tensor(logits, targets, threshold)
        if reason is not None:
            raise ValueError(reason)
        logits = logits.detach()
        if targets.requires_grad:
            targets = targets.detach()
        if logits.is_cpu and logits.numel() <= DEFER_MAX_ELEMENTS:
            return cls(logits, targets, None, threshold, ignore_index)  # checked later
        hits = _count(logits, targets, threshold, ignore_index)
        return cls(None, None, hits, threshold, ignore_index)

    def counted(self) -> Accuracy:
        """This step with its hits counted now (kept tensors: on the calling thread).

        Raises:
            ValueError: Kept logits whose shapes do not compare with the targets'.
        """
        if self.hits is not None:
            return self
        hits = _count(self.logits, self.targets, self.threshold, self.ignore)
        return Accuracy(None, None, hits, self.threshold, self.ignore)

    def __float__(self) -> float:
        if not self.intact:
            return math.nan
        if self.hits is None:
            return float(_hit_rates([self])[0])
        hits, valid = self.hits.tolist()
        return hits / valid if valid else math.nan


def _count(
    logits: torch.Tensor, targets: torch.Tensor, threshold: float | None, ignore: int | None
) -> torch.Tensor:
    """``[hits, predictions]`` of one step, on the logits' device (no synchronisation).

    Raises:
        ValueError: The shapes do not compare (:func:`check_comparable`).
    """
    dim = check_comparable(logits, targets, threshold)
    with torch.no_grad():
        if threshold is not None:
            same = (logits > threshold) == (targets > 0.5)
            valid = torch.ones_like(same).sum()
        elif ignore is None:  # a negative target never equals an argmax: no hit
            same, valid = logits.argmax(dim) == targets, (targets >= 0).sum()
        else:
            kept = (targets >= 0) & (targets != ignore)
            same, valid = (logits.argmax(dim) == targets) & kept, kept.sum()
        return torch.stack((same.sum(), valid))


def binary_threshold(loss_fn: Any) -> float | None:
    """The decision threshold of a binary loss's outputs: 0 for ``BCEWithLogitsLoss`` (logits),
    0.5 for ``BCELoss`` (probabilities); None for any other loss (argmax accuracy)."""
    if isinstance(loss_fn, torch.nn.BCEWithLogitsLoss):
        return 0.0
    if isinstance(loss_fn, torch.nn.BCELoss):
        return 0.5
    return None


def class_ignore_index(loss_fn: Any) -> int | None:
    """The non-negative ``ignore_index`` of a ``CrossEntropyLoss`` or ``NLLLoss`` (255 in many
    segmentation sets), or the one a plain callable declares (its ``ignore_index`` attribute, a
    ``functools.partial``'s keyword: as the measurements take it), to pass as
    :func:`step_accuracy`'s ``ignore_index``; None for any other loss module and for a negative
    one (negative targets are left out anyway)."""
    if isinstance(loss_fn, torch.nn.CrossEntropyLoss | torch.nn.NLLLoss):
        index = int(loss_fn.ignore_index)
    elif isinstance(loss_fn, torch.nn.Module) or not callable(loss_fn):
        return None
    else:
        index = callable_ignore_index(loss_fn)
    return index if index >= 0 else None


def step_accuracy(
    logits: Any,
    targets: Any,
    warned: set[str],
    threshold: float | None = None,
    ignore_index: int | None = None,
    say: Callable[[str], None] | None = None,
) -> Accuracy | float:
    """:meth:`Accuracy.of`, never raising: NaN, and one warning, if the two do not compare.

    Args:
        logits: The step's model outputs.
        targets: Its targets.
        warned: What was said already (shared with ``Agent.log``: the keys here are no custom
            scalar's name); a step counted here marks that the accuracy was available.
        threshold: A binary loss's decision threshold, or None (argmax accuracy).
        ignore_index: A non-negative target to leave out like the negative ones, or None.
        say: Called once with the reason, with the warning (the agent's
            ``accuracy-unavailable`` event).

    Returns:
        The step's :class:`Accuracy`, or NaN. ``logits`` that are a counted :class:`Accuracy`
        already (an optimizer step's micro-batches summed by a framework callback) are
        returned as they are.
    """
    if isinstance(logits, Accuracy) and logits.hits is not None:
        warned.add(_COUNTED)
        return logits
    try:
        a = Accuracy.of(logits, targets, threshold, ignore_index)
    except Exception as exc:  # never into the training loop
        if _WARNED not in warned:
            warned.add(_WARNED)
            # counted before: only some steps lack it
            log.warning(nan_accuracy_console(str(exc), seen=_COUNTED in warned))
            if say is not None:
                say(str(exc))
        return math.nan
    if a.hits is not None and _COUNTED not in warned:
        warned.add(_COUNTED)
    return a


def accuracies(
    column: Sequence[Accuracy], stream: Any = None, problems: set[str] | None = None
) -> npt.NDArray[np.float64]:
    """Evaluate a batch's accuracies (on the publisher thread) in a few small kernels.

    Runs of deferred steps with logits and targets of one shape are stacked, at most
    :data:`STACK_MAX_ELEMENTS` logits per kernel; counted steps are stacked at once (GPU hit
    counts read on ``stream`` without blocking, :mod:`~stiffmon_agent.gpu_readback`); anything
    that does not stack is evaluated alone, and what fails is NaN. Why a kept step failed (its
    shapes do not compare) is added to ``problems``.
    """
    out = np.full(len(column), math.nan)
    if column and column[0].hits is None:  # the usual batch: every step kept, one shape
        k = max(1, STACK_MAX_ELEMENTS // max(1, column[0].logits.numel()))
        try:
            for i in range(0, len(column), k):
                run = column[i : i + k]
                out[i : i + len(run)] = _kept_rates(run)
            return out
        except Exception:  # a counted step, another shape: step by step below
            out[:] = math.nan
    counted = [i for i, a in enumerate(column) if a.hits is not None]
    if counted:
        try:
            counts = stacked_float64([column[i].hits for i in counted], stream).reshape(-1, 2)
            hits, n = counts[:, 0], counts[:, 1]
            with np.errstate(divide="ignore", invalid="ignore"):
                out[counted] = np.where(n > 0, hits / np.maximum(n, 1), math.nan)
        except Exception:
            out[counted] = [float_or_nan(column[i]) for i in counted]
    i = 0
    while i < len(column):
        a = column[i]
        if a.hits is not None:
            i += 1
            continue
        k = max(1, STACK_MAX_ELEMENTS // max(1, a.logits.numel()))
        j = i + 1
        while (
            j < len(column)
            and j - i < k
            and column[j].hits is None
            and column[j].logits.shape == a.logits.shape
            and column[j].targets.shape == a.targets.shape
        ):
            j += 1
        try:
            out[i:j] = _kept_rates(column[i:j])
        except Exception as exc:
            out[i:j] = [float_or_nan(column[m]) for m in range(i, j)]
            if problems is not None:
                problems.add(str(exc))
        i = j
    return out


def _kept_rates(run: Sequence[Accuracy]) -> npt.NDArray[np.float64]:
    """:func:`_hit_rates` of kept steps of one shape, NaN where a kept tensor changed since."""
    return np.where([a.intact for a in run], _hit_rates(run), math.nan)


def _hit_rates(run: Sequence[Accuracy]) -> npt.NDArray[np.float64]:
    """Hit rates (hits over targets ≥ 0 and not ``ignore``) of kept steps of one shape and rule,
    stacked in one torch call each (below the parallel grain: no thread team), counted in numpy
    (a few µs, single-threaded) on the stacked memory; in torch where numpy has no view of it
    (bfloat16)."""
    t_logits = torch.stack([a.logits for a in run])  # one call; raises if shapes differ
    t_targets = torch.stack([a.targets for a in run])
    threshold, ignore = run[0].threshold, run[0].ignore
    dim = check_comparable(run[0].logits, run[0].targets, threshold)
    axis = -1 if dim == -1 else dim + 1  # in the stacked tensors
    k = len(run)
    if threshold is not None:  # a binary loss: every output element is a prediction
        same_t = (t_logits > threshold) == (t_targets > 0.5)
        return same_t.reshape(k, -1).double().mean(dim=1).numpy()
    try:
        targets = t_targets.numpy()
        same = np.equal(t_logits.numpy().argmax(axis), targets).reshape(k, -1)
        valid = (targets >= 0).reshape(k, -1)  # a negative target is padding
    except (TypeError, RuntimeError):  # no numpy view of this tensor
        same = (t_logits.argmax(axis) == t_targets).reshape(k, -1).numpy()
        valid = (t_targets >= 0).reshape(k, -1).numpy()
    if ignore is not None:  # a non-negative ignore_index may equal an argmax
        valid &= (t_targets != ignore).reshape(k, -1).numpy()
        same &= valid
    n = valid.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, same.sum(axis=1) / np.maximum(n, 1), math.nan)


def float_or_nan(value: Any) -> float:
    """``float(value)``, or NaN for what does not convert (a column's values one by one)."""
    try:
        return float(value)
    except Exception:
        return math.nan
