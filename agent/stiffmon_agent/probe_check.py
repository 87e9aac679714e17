"""Whether a due measurement can be taken: the weights and the train-probe loss are finite.

* :func:`check_finite`: a due measurement raises :class:`MeasurementSkipped` while the weights
  or the train-probe loss are not finite (the agent turns it into an ``event``);
* :func:`probe_losses`: the per-example losses of a slice of the probe, without gradients where
  the forward and loss allow it, else in grad mode (a loss that differentiates with respect to
  its inputs: an EBM's Langevin negatives, sliced score matching, a gradient penalty).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from stiffmon_agent.metrics import measurement_mode
from stiffmon_agent.metrics.probe import (
    ForwardFn,
    LossFn,
    default_forward,
    per_example_losses,
    unreduced,
)
from stiffmon_agent.probe_set import MeasurementSkipped, ProbeSet

__all__ = ["MeasurementSkipped", "check_finite", "probe_losses"]


def check_finite(
    model: nn.Module,
    loss_fn: LossFn,
    probe: ProbeSet,
    forward: ForwardFn | None = None,
    *,
    losses: bool = True,
) -> None:
    """Raise :class:`MeasurementSkipped` if a parameter or (with ``losses``) the train-probe
    loss is not finite.

    Without ``losses`` only the parameters are checked: a measurement that finds non-finite
    values itself (the Gram matrix of the per-example gradients) is spared a forward pass.
    """
    for name, q in model.named_parameters():
        if q.requires_grad and not bool(torch.isfinite(q).all()):
            raise MeasurementSkipped(f"parameter {name} is not finite (the run has diverged)")
    if not losses:
        return
    x, y = probe.train()
    values = probe_losses(model, loss_fn, x, y, probe.n_train, forward)
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise MeasurementSkipped(
            f"the probe loss is not finite for {bad} of {probe.n_train} examples"
        )


def probe_losses(
    model: nn.Module, loss_fn: LossFn, x: Any, y: Any, n: int, forward: ForwardFn | None
) -> Tensor:
    """The ``n`` per-example losses of probe inputs ``x`` and targets ``y``, detached, in
    measurement mode: without gradients, or, where that fails, in grad mode (a forward or
    loss that differentiates with respect to its inputs fails without them).

    Raises:
        ValueError: The forward failed in both modes (saying how it was called).
    """
    with measurement_mode(model):
        try:
            with torch.no_grad():
                return _losses(model, loss_fn, x, y, n, forward)
        except Exception:
            return _losses(model, loss_fn, x, y, n, forward).detach()


def _losses(
    model: nn.Module, loss_fn: LossFn, x: Any, y: Any, n: int, forward: ForwardFn | None
) -> Tensor:
    try:
        out = (forward or default_forward)(model, x)
    except Exception as exc:
        how = (
            "forward(model, inputs)"
            if forward is not None
            else "model(**inputs)"
            if isinstance(x, dict)
            else "model(*inputs)"
            if isinstance(x, tuple | list)
            else "model(inputs)"
        )
        raise ValueError(
            f"the probe forward {how} failed ({type(exc).__name__}: {exc}); pass "
            "forward=lambda model, inputs: ... to Agent for models called another way"
        ) from exc
    return per_example_losses(unreduced(loss_fn), out, y, n)
