"""``Agent.set_optimizer``: a loop that replaces its optimizer object mid-run (Adam for a
warm-up, then SGD; a new optimizer after unfreezing a backbone) hands the agent the new one.

:class:`OptimizerSwap` is a base of :class:`~stiffmon_agent.agent.Agent` (which sets the
attributes declared here). Everything the agent reads from the optimizer follows the new one from
the next ``agent.step()``: the per-step columns (``lr/i``, ``momentum/i`` …, read at its
``step()``), the stability thresholds and the preconditioned sharpness, the parameters the
measurements cover (those it holds) and ``maximize``. The Hessian does not depend on the
optimizer: the sharpness warm starts carry over (one of another size, where the new optimizer holds
other parameters, is not used: that measurement starts cold).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from stiffmon_agent.announce import maximize_note, measured_param_count, unoptimized_note
from stiffmon_agent.metrics.probe import LossFn
from stiffmon_agent.metrics.thresholds import maximizes
from stiffmon_agent.optimizer_read import framework_inner, optimizer_config
from stiffmon_agent.probe_set import ProbeSet, objective_loss
from stiffmon_agent.runner import MeasurementRunner
from stiffmon_agent.step_scalars import OptimizerColumns

__all__ = ["OptimizerSwap"]


class OptimizerSwap:
    """:meth:`set_optimizer`; ``Agent`` sets the attributes below."""

    model: nn.Module
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer | None
    probe: ProbeSet | None
    step_count: int
    closed: bool
    enabled: bool  # publishes (False: a rank other than 0)
    _optimizer_columns: OptimizerColumns
    _runner: MeasurementRunner | None

    if TYPE_CHECKING:  # AgentOutput's, the agent's other base

        def event(self, code: str, message: str, level: str = "info", **attrs: Any) -> None: ...

        def warn(self, code: str, note: str, *, console: bool = True, **attrs: Any) -> None: ...

    def set_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Follow ``optimizer`` instead of the one the agent was given, from the next step on.

        Call it where the loop replaces its optimizer object, before the new one's first
        ``step()`` (or between that and ``agent.step()``). The step's row, the thresholds of
        the measurements from this step on and the parameters they cover are then the new
        optimizer's; an ``optimizer-replaced`` event (with the new configuration) marks the step
        in the monitor. The run keeps its name, steps and schedules. Under ``distributed=True``
        every rank calls it at the same step (each with its own optimizer). Passing the
        optimizer already followed does nothing.

        Args:
            optimizer: The optimizer whose steps train the model from now on (None: none, as
                ``Agent(optimizer=None)``: no columns and no thresholds).
        """
        optimizer = framework_inner(optimizer)  # accelerate's prepared one: the torch optimizer
        old = self.optimizer
        if optimizer is old or self.closed:
            return
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"set_optimizer takes a torch.optim.Optimizer (or None), not {type(optimizer)}"
            )
        self.optimizer = optimizer
        self._optimizer_columns = self._optimizer_columns.handed_on(optimizer, self.enabled)
        if self._runner is not None and self.probe is not None:
            runner = self._runner
            # count weighting was said with the first optimizer: it does not depend on it
            runner.loss_fn = objective_loss(self.loss_fn, optimizer, self.probe.train()[1])
            runner.optimizer = optimizer
            runner.stepped_groups = self._optimizer_columns.stepped_groups
        cfg = optimizer_config(optimizer)
        was = optimizer_config(old)
        self.event(
            "optimizer-replaced",
            f"from step {self.step_count} the agent follows a new optimizer, {_said(cfg)} (was "
            f"{_said(was)}): per-step lr/momentum, stability thresholds and the measured "
            "parameters are its own",
            optimizer=cfg["type"],
            previous=was["type"],
            param_count=measured_param_count(self.model, optimizer),
        )
        if self.probe is None:
            return
        if (ascent := maximizes(optimizer)) != maximizes(old) and ascent is not False:
            self.event("maximize", maximize_note(ascent))
        if note := unoptimized_note(self.model, optimizer):
            self.warn("params-not-optimized", note)


def _said(cfg: dict[str, Any]) -> str:
    """``SGD (lr 0.05, momentum 0.9)`` from :func:`optimizer_config`'s fields (zeros left out,
    but for the lr)."""
    keys = ("lr", "momentum", "beta1", "beta2", "weight_decay")
    parts = [f"{k} {cfg[k]:g}" for k in keys if cfg.get(k) or (k == "lr" and k in cfg)]
    return f"{cfg['type']} ({', '.join(parts)})" if parts else str(cfg["type"])
