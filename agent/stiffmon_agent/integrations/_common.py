"""What the framework callbacks share: option checking and the agent's life cycle."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from stiffmon_agent.agent import Agent

#: Options the callbacks fill in themselves from what the framework owns.
OWNED = ("model", "loss_fn", "optimizer")


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Check that ``options`` are keyword options of :class:`~stiffmon_agent.Agent`.

    Raises:
        TypeError: An unknown option, or one the framework provides (model, optimizer).
    """
    params = inspect.signature(Agent.__init__).parameters
    for key in options:
        if key in OWNED:
            raise TypeError(f"StiffmonCallback takes {key!r} from the framework, not as an option")
        if key not in params or key == "self":
            known = ", ".join(k for k in params if k not in ("self", *OWNED))
            raise TypeError(f"unknown Agent option {key!r}; the options are: {known}")
    if options.get("distributed"):  # rank 0 alone would wait for the others for ever
        raise ValueError(
            "StiffmonCallback builds the agent on global rank 0 only, where it measures alone: "
            "distributed=True (every rank measuring its share) needs an Agent on every rank; "
            "drop it here, or use the Agent in your own loop (README: Distributed training)"
        )
    return dict(options)


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The innermost torch optimizer inside framework wrappers (accelerate's, Lightning's)."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


class LossAccumulator:
    """Sums the losses of the micro-batches of one optimizer step (gradient accumulation)."""

    def __init__(self) -> None:
        self.total: Tensor | float | None = None
        self.count = 0

    def add(self, loss: Tensor | float) -> None:
        loss = loss.detach() if isinstance(loss, Tensor) else float(loss)
        self.total = loss if self.total is None else self.total + loss
        self.count += 1

    def take(self, mean: bool) -> Tensor | float:
        """The step's loss (sum, or mean over the micro-batches); NaN when none was seen."""
        total, count = self.total, self.count
        self.total, self.count = None, 0
        if total is None:
            return math.nan
        return total / count if mean and count > 1 else total


def build_agent(
    model: nn.Module,
    loss_fn: Any,
    optimizer: torch.optim.Optimizer | None,
    options: dict[str, Any],
    *,
    start_step: int = 0,
    defaults: dict[str, Any] | None = None,
) -> Agent:
    """An :class:`Agent` on what the framework owns, starting its step count at ``start_step``."""
    kwargs = {**(defaults or {}), **options}
    agent = Agent(model, loss_fn, optimizer, **kwargs)
    agent.step_count = start_step
    return agent
