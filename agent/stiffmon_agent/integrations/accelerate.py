"""Hugging Face Accelerate: the agent in a plain ``accelerator.prepare(...)`` loop.

.. code-block:: python

    from stiffmon_agent.integrations.accelerate import AccelerateAgent

    accelerator = Accelerator(gradient_accumulation_steps=4, mixed_precision="bf16")
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    agent = AccelerateAgent(accelerator, model, loss_fn, optimizer, loader=loader,
                            probe=(x_probe, y_probe), record="run.stiff")
    for x, y in loader:
        with accelerator.accumulate(model):
            out = model(x); loss = loss_fn(out, y)
            accelerator.backward(loss); optimizer.step(); scheduler.step(); optimizer.zero_grad()
            agent.step(loss, out, y)          # every micro-batch
    agent.close()

What a plain :class:`~stiffmon_agent.Agent` got wrong in such a loop, and this does instead:

* The prepared ``AcceleratedOptimizer`` is a wrapper of another type: handed to ``Agent``, it
  had no stability threshold (``sharpness/threshold`` NaN, "no stability rule known for
  AcceleratedOptimizer"), no λ1(P⁻¹H) for Adam, no ``batch-size-accumulation`` warning (its own
  step hooks never run), and the run was named ``"AcceleratedOptimizer lr=…"``. The agent gets
  the torch optimizer inside it; its steps (the real ones: ``AcceleratedOptimizer.step()`` does
  nothing on a micro-batch that does not sync) are read by their step hooks.
* ``mixed_precision="bf16"`` / ``"fp16"`` replaces ``model.forward`` by an autocast wrapper
  (also on ``accelerator.unwrap_model(model)``, which keeps it by default), so the measurements
  ran in bfloat16, not in the weights' dtype (λ1_H off by 1.5e-3 relative on a small MLP, and a
  false ``gram-fallback`` warning that "the model couples examples"). Measurements here run the
  model's own ``forward`` (``model._original_forward``) under the agent's autocast-off mode.
* With ``gradient_accumulation_steps = k`` the loop's ``agent.step()`` per micro-batch made one
  recorded step per micro-batch, with B the micro-batch's (η/B k × too large) and measurements
  between micro-batches. Here :meth:`step` takes every micro-batch and steps the agent once per
  optimizer step (``accelerator.sync_gradients``), with the mean of its micro-batch losses and
  the accuracy over all of them; so step n is the n-th optimizer step, as in the Lightning and
  ``Trainer`` callbacks.

B, for η/B: with ``loader=`` (the prepared training loader) B = its per-process batch m × k ×
the process count, and since ``accelerator.backward`` divides each micro-batch's loss by k and
DDP averages the processes' gradients, a sum-reduced loss's objective adds up m examples
(``sum_over=m``). Without it (or ``batch_size=``) B is the step's examples as the agent reads
them from the logits (all micro-batches of one process: small CPU logits are joined; others
are counted at once and give no B). Under several processes only the main process builds an
agent (it measures alone, on ``accelerator.unwrap_model(model)``); the others' :meth:`step`
does nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor, nn

from stiffmon_agent.accuracy import binary_threshold, class_ignore_index
from stiffmon_agent.agent import Agent
from stiffmon_agent.integrations._common import (
    LossAccumulator,
    StepAccuracy,
    build_agent,
    check_options,
    loader_batch_size,
    unwrap_optimizer,
)
from stiffmon_agent.sum_over_option import framework_sum_over

log = logging.getLogger("stiffmon_agent")


class AccelerateAgent:
    """An :class:`~stiffmon_agent.Agent` for a loop prepared by an ``accelerate.Accelerator``,
    stepped after every micro-batch (see the module's docstring).

    Args:
        accelerator: The loop's ``Accelerator``.
        model: The model, prepared or not (measured as ``accelerator.unwrap_model(model)``,
            through its own ``forward``).
        loss_fn: The training loss (``torch.nn`` loss module or per-example callable).
        optimizer: The optimizer, prepared (``AcceleratedOptimizer``) or not.
        loader: Optional training loader (prepared): B = its per-process batch × k × processes.
        **options: Any other keyword options of :class:`~stiffmon_agent.Agent` (``probe``,
            ``record``, ``gram_every``, ``batch_size``, ``sum_over``, …).

    Raises:
        TypeError: An unknown option.
        ValueError: ``distributed=True`` (only the main process has an agent).
    """

    def __init__(
        self,
        accelerator: Any,
        model: nn.Module,
        loss_fn: Any,
        optimizer: Any,
        *,
        loader: Any = None,
        **options: Any,
    ) -> None:
        if options.get("distributed"):
            raise ValueError(
                "AccelerateAgent builds the agent on the main process only, where it measures "
                "alone: drop distributed=True, or make an Agent on every process yourself "
                "(README: Distributed training)"
            )
        options = check_options(options)
        self.accelerator = accelerator
        self.agent: Agent | None = None
        self._loss = LossAccumulator()
        self._accuracy = StepAccuracy(binary_threshold(loss_fn), class_ignore_index(loss_fn))
        if not accelerator.is_main_process:
            return
        k = max(1, int(getattr(accelerator, "gradient_accumulation_steps", 1)))
        world = max(1, int(getattr(accelerator, "num_processes", 1)))
        defaults: dict[str, Any] = {}
        if (m := process_batch(loader, world)) is not None:
            defaults = {"batch_size": m * k * world, "sum_over": framework_sum_over(m)}
        elif (k > 1 or world > 1) and getattr(loss_fn, "reduction", None) == "sum":
            log.warning(
                "stiffmon: a sum-reduced loss with %d micro-batches per step over %d process(es): "
                "pass AccelerateAgent(loader=...) or sum_over= (the per-process micro-batch), "
                "else the sharpness and its threshold are taken for the sum over B",
                k,
                world,
            )
        start = int(options.pop("start_step", 0) or 0)  # resumed (accelerator.load_state)
        self.agent = build_agent(
            accelerator.unwrap_model(model),
            loss_fn,
            unwrap_optimizer(optimizer) or optimizer,
            options,
            start_step=start,
            defaults=defaults,
        )

    def step(
        self, loss: Tensor | float, logits: Tensor | None = None, targets: Tensor | None = None
    ) -> None:
        """One micro-batch: its loss (as computed, before ``accelerator.backward`` divides it by
        k) and optionally its logits and targets. The agent steps at the micro-batch that ends
        an optimizer step (``accelerator.sync_gradients``), with the mean loss and the accuracy
        of the step's micro-batches."""
        if self.agent is None:
            return
        self._loss.add(loss)
        if isinstance(logits, Tensor) and isinstance(targets, Tensor):
            self._accuracy.add(logits, targets)
        if not self.accelerator.sync_gradients:
            return
        self.agent.step(self._loss.take(mean=True), *self._accuracy.take())

    def log(self, step: int | None = None, **values: Any) -> None:
        """Publish scalars of your own (:meth:`stiffmon_agent.Agent.log`)."""
        if self.agent is not None:
            self.agent.log(step=step, **values)

    def close(self, reason: str = "closed") -> None:
        """Flush every step and close the agent."""
        if self.agent is not None:
            self.agent.close(reason=reason)

    def __enter__(self) -> AccelerateAgent:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("closed" if exc_type is None else f"error: {exc_type.__name__}")


def process_batch(loader: Any, world: int) -> int | None:
    """One process's micro-batch of ``loader`` (None: no loader, or no fixed batch size): a
    prepared loader's ``total_batch_size`` / processes, else its ``batch_size``."""
    if loader is None:
        return None
    total = getattr(loader, "total_batch_size", None)
    if isinstance(total, int) and total > 0:
        return max(1, total // world)
    return loader_batch_size(loader)
