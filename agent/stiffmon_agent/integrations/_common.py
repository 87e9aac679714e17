"""What the framework callbacks share: option checking and the agent's life cycle."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from stiffmon_agent.accuracy import Accuracy
from stiffmon_agent.agent import Agent
from stiffmon_agent.class_target import class_labels_of
from stiffmon_agent.metrics.probe import batch_size
from stiffmon_agent.optimizer_read import default_run_name, optimizer_config

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
    check_probe_class_target(options)
    if options.get("distributed"):  # rank 0 alone would wait for the others for ever
        raise ValueError(
            "StiffmonCallback builds the agent on global rank 0 only, where it measures alone: "
            "distributed=True (every rank measuring its share) needs an Agent on every rank; "
            "drop it here, or use the Agent in your own loop (README: Distributed training)"
        )
    return dict(options)


def check_probe_class_target(options: dict[str, Any]) -> None:
    """Check now, where the callback is made, that ``class_target`` names the class indices of
    the train probe's targets (the agent is made when training starts, and checks again over
    the train and validation probes).

    Raises:
        ValueError: If ``class_target`` names no class indices of the probe's targets.
        TypeError: If it is not a str, int or callable.
    """
    probe, class_target = options.get("probe"), options.get("class_target")
    if class_target is None or not (isinstance(probe, tuple | list) and len(probe) == 2):
        return
    class_labels_of(probe[1], class_target, batch_size(probe[1]))


def loader_batch_size(loader: Any) -> int | None:
    """A training loader's batch size (its ``batch_size``, else its batch sampler's): one
    process's micro-batch; None where it has no fixed one."""
    bs = getattr(loader, "batch_size", None)
    if bs is None:
        bs = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return bs if isinstance(bs, int) and bs > 0 else None


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The innermost torch optimizer inside framework wrappers (accelerate's, Lightning's)."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def follow_optimizer(agent: Agent, held: Any, current: Any) -> Any:
    """Hand ``agent`` the framework's optimizer ``current`` (as the framework holds it, wrapped
    or not) where it is not the one ``held`` (a callback or a fine-tuning stage replaced it:
    :meth:`~stiffmon_agent.agent.Agent.set_optimizer`); returns the one now held."""
    if current is not held:
        agent.set_optimizer(unwrap_optimizer(current))
    return current


class StepAccuracy:
    """An optimizer step's accuracy over all its micro-batches (gradient accumulation).

    Each micro-batch is taken as :meth:`~stiffmon_agent.accuracy.Accuracy.of` takes a step:
    small CPU logits are kept, others counted at once (no big logits held over the step), with
    the agent's rules (targets < 0 and ``ignore_index`` are no predictions, a binary loss's
    ``threshold``). :meth:`take` gives what to pass to ``Agent.step`` after the loss.
    """

    def __init__(self, threshold: float | None = None, ignore_index: int | None = None) -> None:
        self.threshold, self.ignore_index = threshold, ignore_index
        self._parts: list[Accuracy] = []
        self._bad: tuple[Tensor, Tensor] | None = None  # shapes that do not compare

    def add(self, logits: Tensor, targets: Tensor) -> None:
        """One micro-batch's logits and targets."""
        if self._bad is not None:
            return
        try:
            self._parts.append(Accuracy.of(logits, targets, self.threshold, self.ignore_index))
        except ValueError:  # counted at once and the shapes do not compare: the agent says why
            self._bad = _shapes_only(logits), _shapes_only(targets)

    def take(self) -> tuple[Any, Any]:
        """``(logits, targets)`` for ``Agent.step`` (then reset): (None, None) without any
        micro-batch; one micro-batch's own; several: the kept ones joined where they have one
        layout, else the hits summed over them (a counted ``Accuracy``, which the agent takes
        as it is; NaN where kept tensors changed in place since)."""
        parts, bad = self._parts, self._bad
        self._parts, self._bad = [], None
        if bad is not None:
            return bad
        if not parts:
            return None, None
        if not all(a.intact for a in parts):
            hits = torch.zeros(2, dtype=torch.long)  # no predictions: NaN
            return Accuracy(None, None, hits), hits
        layouts = {
            (a.logits.shape[1:], a.targets.shape[1:])
            if a.hits is None and a.logits.dim() and a.targets.dim()
            else None
            for a in parts
        }
        if len(layouts) == 1 and None not in layouts:
            # the agent counts them later, off the training thread, as one step's
            return torch.cat([a.logits for a in parts]), torch.cat([a.targets for a in parts])
        counts = []
        for a in parts:
            try:
                counts.append(a.counted().hits)
            except ValueError:  # kept, and its shapes do not compare
                return _shapes_only(a.logits), _shapes_only(a.targets)
        hits = torch.stack(counts).sum(dim=0)
        return Accuracy(None, None, hits, self.threshold, self.ignore_index), hits


def _shapes_only(t: Tensor) -> Tensor:
    """A tensor of ``t``'s shape and dtype without data: the agent's check says what is wrong."""
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


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
    """An :class:`Agent` on what the framework owns, starting its step count at ``start_step``.

    A run resumed from a checkpoint (``start_step`` > 0) is named ``"<run> (resumed at step
    N)"``, so that the monitor tells it from the run it continues.
    """
    kwargs = {**(defaults or {}), **options}
    if start_step > 0:
        kwargs["run"] = f"{kwargs.get('run') or default_run_name(optimizer_config(optimizer))} " + (
            f"(resumed at step {start_step})"
        )
    return Agent(model, loss_fn, optimizer, start_step=start_step, **kwargs)
