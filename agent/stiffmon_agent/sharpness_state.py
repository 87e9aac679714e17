"""What the sharpness measurement carries from one measurement to the next, when a warm start
is checked by a cold one (:func:`~stiffmon_agent.metrics.eigen_checked.checked_lanczos`), and
which multiple of the probe's mean loss the training objective is (:func:`objective_scale`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor

from stiffmon_agent.metrics import EigenResult
from stiffmon_agent.metrics.probe import LossFn, loss_reduction
from stiffmon_agent.probe_set import MeasurementSkipped

__all__ = [
    "CHECK_DROP",
    "CHECK_EVERY",
    "CHUNKS_CHECK_EVERY",
    "SharpnessState",
    "check_products",
    "objective_scale",
]


CHUNKS_CHECK_EVERY = 10
"""The chunk-coupling check (:func:`~stiffmon_agent.metrics.chunk_coupling.chunking_changes_losses`,
two forward passes over the probe) runs at the first sharpness measurement and every 10th
after, until it has found coupling: a model's coupling is mostly its architecture's, and the
passes cost a few percent of a measurement."""


@dataclass
class SharpnessState:
    """What the sharpness measurement carries from one measurement to the next.

    Attributes:
        warm: Ritz vectors of the raw Hessian (``EigenResult.warm_start``), for the next
            warm start.
        warm_precond: The same for P^{-1/2} H P^{-1/2} (adaptive optimizers).
        batch_size: The training batch size B (from ``batch_size=`` or the logits of a step):
            a sum-reduced objective's Hessian is B × that of the per-example mean.
        sum_over: The examples a sum-reduced objective adds up per optimizer step after the
            loop's own scaling (``sum_over=``), where that is not B: the micro-batch under
            ``(loss / k).backward()`` accumulation, or B / W under DDP (a fraction where W does
            not divide B; :mod:`~stiffmon_agent.rank_batches`).
        active: (ranks still training, W) while some rank has joined under ``Join`` and DDP
            divides by the initial W: a mean-reduced objective is W_active/W × the (weighted)
            per-example mean (:mod:`~stiffmon_agent.agent_join`); None otherwise.
        reported: Event codes already published (each reason is said once).
        last: The last λ1 of each operator (``"raw"``, ``"precond"``).
        unchecked: Warm measurements of each operator since the last cold start.
        measured: Sharpness measurements so far (the chunk-coupling check runs at the first
            and every :data:`CHUNKS_CHECK_EVERY`-th).
    """

    warm: Tensor | None = None
    warm_precond: Tensor | None = None
    batch_size: int | None = None
    sum_over: float | None = None
    active: tuple[int, int] | None = None
    reported: set[str] = field(default_factory=set)
    last: dict[str, float] = field(default_factory=dict)
    unchecked: dict[str, int] = field(default_factory=dict)
    measured: int = 0

    @property
    def sum_scale(self) -> float | None:
        """The factor of a sum-reduced objective over the per-example mean: ``sum_over``, else
        B (None: unknown)."""
        return self.sum_over or self.batch_size

    def check_below(self, which: str) -> float | None:
        """``check_below`` of the next warm measurement of ``which``: a θ1 more than
        :data:`CHECK_DROP` below the last λ1 is checked by a cold start, and every
        :data:`CHECK_EVERY`-th warm measurement is (None before any λ1)."""
        last = self.last.get(which)
        if last is None or not math.isfinite(last):
            return None
        if self.unchecked.get(which, 0) + 1 >= CHECK_EVERY:
            return math.inf
        return last - CHECK_DROP * abs(last)

    def note(self, which: str, res: EigenResult) -> None:
        """Remember a measurement's λ1 and whether a cold start checked it."""
        self.unchecked[which] = 0 if res.cold_checked else self.unchecked.get(which, 0) + 1
        self.last[which] = float(res.eigenvalues[0]) if res.eigenvalues.numel() else math.nan


CHECK_DROP = 0.1
CHECK_EVERY = 10


def check_products(res: EigenResult, what: str) -> None:
    """Raise :class:`MeasurementSkipped` if a Hessian-vector product was not finite."""
    if res.nonfinite:
        raise MeasurementSkipped(
            f"a Hessian-vector product for {what} is not finite (the run is diverging)"
        )


def objective_scale(loss_fn: LossFn, state: SharpnessState) -> tuple[float, str]:
    """The factor c by which the training objective is c × the probe's per-example mean, and
    its name for the spectrum.

    A mean-reduced loss: c = 1. A sum-reduced one: c = ``state.sum_over`` (the examples a
    backward sums over) or else the batch size B; unknown B: NaN (the per-example mean is
    measured and no threshold published). Under ``Join`` with a mean loss DDP divides the
    still-training ranks' mean losses by W: c = W_active/W.
    """
    if loss_reduction(loss_fn) == "sum":
        if state.sum_over:
            return float(state.sum_over), f"sum over {state.sum_over} examples"
        if state.batch_size:
            return float(state.batch_size), f"sum over a batch of {state.batch_size}"
        return math.nan, "per-example mean (batch size unknown)"
    if state.active is not None:
        live, world = state.active
        return live / world, f"mean × {live}/{world} (ranks still training / W: some have joined)"
    return 1.0, "mean"
