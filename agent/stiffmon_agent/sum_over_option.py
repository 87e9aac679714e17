"""``sum_over=``: the user's value, a framework integration's default, and a mean loss.

A sum-reduced objective adds up the losses of ``sum_over`` examples per optimizer step, so its
Hessian is ``sum_over`` × that of the per-example mean (the sharpness and its threshold scale
by it). A mean-reduced objective (1/B) Σ_i L_i does not depend on it: there ``sum_over=`` is
ignored. A user who passes it with a mean loss has a wrong idea of the loss (or of the option),
so the agent says so (:func:`sum_over_note`); the framework integrations pass their own default
(the loader's micro-batch) whatever the loss, wrapped in :class:`FrameworkSumOver`, which the
agent reads as the number it is and never warns about.
"""

from __future__ import annotations

from typing import Any

from stiffmon_agent.metrics.probe import LossFn, loss_reduction
from stiffmon_agent.sharpness_state import SharpnessState


class FrameworkSumOver(int):
    """A ``sum_over`` an integration sets by default (not the user's): an ``int`` like any other,
    told apart by its type so that a mean-reduced loss gets no warning for it."""

    def __repr__(self) -> str:
        return int.__repr__(self)


def framework_sum_over(m: int | None) -> FrameworkSumOver | None:
    """An integration's default ``sum_over`` of ``m`` examples (None stays None)."""
    return None if m is None else FrameworkSumOver(m)


def sharpness_state(batch_size: int | None, sum_over: Any, replicas: int) -> SharpnessState:
    """The agent's :class:`SharpnessState` with B and ``sum_over`` (a plain number there).

    Without ``sum_over`` and with B given under DDP over W replicas (which average the ranks'
    gradients), a sum-reduced objective adds up B / W examples.

    Raises:
        ValueError: If ``sum_over`` is not a positive number of examples.
    """
    if sum_over is not None and (isinstance(sum_over, bool) or not sum_over >= 1):
        raise ValueError(f"sum_over must be a positive number of examples, got {sum_over}")
    plain = int(sum_over) if isinstance(sum_over, FrameworkSumOver) else sum_over
    state = SharpnessState(batch_size=batch_size, sum_over=plain)
    if sum_over is None and batch_size is not None and replicas > 1:
        state.sum_over = batch_size / replicas  # B / W: rank_batches
    return state


def sum_over_note(sum_over: Any, loss_fn: LossFn) -> str | None:
    """The warning for a user's ``sum_over`` with a mean-reduced loss, which ignores it; None
    for a sum-reduced loss, no ``sum_over``, or an integration's default
    (:class:`FrameworkSumOver`)."""
    if sum_over is None or isinstance(sum_over, FrameworkSumOver):
        return None
    if loss_reduction(loss_fn) == "sum":
        return None
    reduction = getattr(loss_fn, "reduction", None)
    if reduction is None:
        what = (
            f"the loss ({type(loss_fn).__name__}, a callable without a reduction attribute) "
            "is taken as mean-reduced"
        )
        fix = 'if the loop sums the losses, give the callable a reduction = "sum" attribute'
    else:
        what = f'the loss is mean-reduced ({type(loss_fn).__name__}, reduction="{reduction}")'
        fix = 'if the loop sums the losses, give the loss with reduction="sum"'
    return (
        f"sum_over={sum_over} is ignored: {what}, and a mean objective (1/B) Σ L_i does not "
        "depend on how many examples a step adds up (sum_over= is for a sum-reduced loss: "
        f"the sharpness and its threshold scale by it); drop sum_over=, or {fix}"
    )
