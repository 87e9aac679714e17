"""PyTorch Lightning (≥ 2) callback: the agent on the ``LightningModule`` and its optimizer.

.. code-block:: python

    from stiffmon_agent.integrations.lightning import StiffmonCallback

    cb = StiffmonCallback(probe=(x_probe, y_probe), run="adam lr=1e-3", record="run.stiff")
    trainer = lightning.Trainer(callbacks=[cb], max_epochs=5)
    trainer.fit(module, train_loader)

The callback builds an :class:`~stiffmon_agent.Agent` when fitting starts, on the module (called
as ``module(inputs)`` unless ``forward=`` says otherwise) and the trainer's first optimizer (or
``optimizer_index``), with the module's own loss: ``loss_fn=`` if given, else the module's
``loss_fn``, ``criterion`` or ``loss_func`` attribute (a ``torch.nn`` loss module or a callable
returning one loss per example). Without any loss only the per-step scalars are published.

It steps the agent once per optimizer step (``trainer.global_step`` advanced), with the step's
loss — the mean of its micro-batch losses (Lightning reports each divided by
``accumulate_grad_batches``, also on an epoch's last, shorter accumulation) — so gradient
accumulation is respected. The accuracy needs the logits: a ``training_step`` that returns
``{"loss": loss, "logits": logits}`` (and ``"targets"``, else the batch's second item or its
``"targets"`` / ``"labels"`` entry) gets the step's accuracy over all its micro-batches. A fit
resumed from a checkpoint continues the step count, as a run named ``"<run> (resumed at step
N)"``. Under multi-GPU / multi-node
strategies only global rank 0 builds an agent and publishes. The agent is closed when fitting
ends, or with the error's name when it fails.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from stiffmon_agent.accuracy import binary_threshold, class_ignore_index
from stiffmon_agent.agent import Agent
from stiffmon_agent.integrations._common import (
    LossAccumulator,
    StepAccuracy,
    build_agent,
    check_options,
    follow_optimizer,
    loader_batch_size,
    unwrap_optimizer,
)
from stiffmon_agent.sum_over_option import framework_sum_over

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone distribution
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError(
            'the Lightning integration needs lightning: pip install "stiffmon[lightning]"'
        ) from exc

log = logging.getLogger("stiffmon_agent")

LOSS_ATTRIBUTES = ("loss_fn", "criterion", "loss_func")
TARGET_KEYS = ("targets", "target", "labels", "label", "y")
NO_ACCURACY = (
    'no accuracy: return {"loss": loss, "logits": logits} from training_step for it (the '
    'targets: its "targets" entry, else the batch\'s second item)'
)


def module_loss(module: nn.Module) -> Any:
    """The module's own loss: its ``loss_fn``, ``criterion`` or ``loss_func`` attribute, or None."""
    for name in LOSS_ATTRIBUTES:
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    return None


class StiffmonCallback(Callback):  # type: ignore[misc]
    """Attach a stiffmon :class:`~stiffmon_agent.Agent` to a Lightning ``Trainer``.

    Args:
        loss_fn: Per-example loss (``torch.nn`` loss module or callable). Default: the module's
            ``loss_fn`` / ``criterion`` / ``loss_func`` attribute.
        optimizer_index: Which of the trainer's optimizers the agent reads (lr, momentum, state).
        **options: Any keyword option of :class:`~stiffmon_agent.Agent`: ``probe``,
            ``val_probe``, ``run``, ``endpoint``, ``record``, ``class_names``, ``forward``,
            ``gram_every``, ``sharpness_every``, ``overhead_cap``, … (``batch_size`` defaults to
            the effective batch: loader batch × accumulation × world size).

    Raises:
        TypeError: An option :class:`~stiffmon_agent.Agent` does not take.
    """

    def __init__(self, loss_fn: Any = None, *, optimizer_index: int = 0, **options: Any) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.optimizer_index = optimizer_index
        self.options = check_options(options)
        self.agent: Agent | None = None
        self._loss = LossAccumulator()
        self._accuracy = StepAccuracy()
        self._last_global_step = 0
        self._optimizer: Any = None  # the trainer's optimizer the agent reads, as it holds it

    # ------------------------------------------------------------------ life cycle

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        if self.agent is not None or not trainer.is_global_zero:
            return
        self._optimizer = _nth(trainer.optimizers, self.optimizer_index)
        optimizer = unwrap_optimizer(self._optimizer)
        loss_fn = self.loss_fn if self.loss_fn is not None else module_loss(pl_module)
        options = dict(self.options)
        if loss_fn is None and options.get("probe") is not None:
            log.warning(
                "stiffmon: no per-example loss (give StiffmonCallback(loss_fn=...) or a "
                f"{'/'.join(LOSS_ATTRIBUTES)} attribute on the module): per-step scalars only"
            )
            options["probe"] = options["val_probe"] = None
        # Lightning divides each micro-batch's loss by the accumulation and DDP averages the
        # ranks' gradients: a sum-reduced objective adds up one rank's micro-batch
        # (the default is not the user's sum_over=: no warning with a mean-reduced loss)
        loader = framework_sum_over(_loader_batch(trainer))
        defaults = {"batch_size": _effective_batch(trainer), "sum_over": loader}
        self._last_global_step = int(trainer.global_step)
        self.agent = build_agent(
            pl_module,
            loss_fn if loss_fn is not None else _no_loss,
            optimizer,
            options,
            start_step=self._last_global_step,
            defaults=defaults,
        )
        self.agent.no_accuracy_note = NO_ACCURACY
        self._accuracy = StepAccuracy(binary_threshold(loss_fn), class_ignore_index(loss_fn))

    def on_train_batch_end(
        self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.agent is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor | float | int):
            self._loss.add(loss)
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
        if isinstance(logits, Tensor):
            targets = outputs.get("targets")
            targets = targets if isinstance(targets, Tensor) else batch_targets(batch)
            if targets is not None:
                self._accuracy.add(logits, targets)
        step = int(trainer.global_step)
        if step == self._last_global_step:
            return  # accumulating: no optimizer step yet
        self._last_global_step = step
        now = _nth(trainer.optimizers, self.optimizer_index)  # replaced by a fine-tuning stage?
        self._optimizer = follow_optimizer(self.agent, self._optimizer, now)
        # Lightning divides each micro-batch loss by accumulate_grad_batches, also on an epoch's
        # last step with fewer micro-batches: the mean is the sum × accumulate / micro-batches.
        accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1)))
        count = self._loss.count
        loss = self._loss.take(mean=False)
        if count and count != accumulate:
            loss = loss * (accumulate / count)
        self.agent.step(loss, *self._accuracy.take())

    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self._close("closed")

    def on_exception(self, trainer: Any, pl_module: nn.Module, exception: BaseException) -> None:
        self._close(f"error: {type(exception).__name__}")

    def teardown(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        self._close("closed")

    def _close(self, reason: str) -> None:
        if self.agent is not None:
            self.agent.close(reason=reason)
            self.agent = None


def batch_targets(batch: Any) -> Tensor | None:
    """A training batch's targets, as the probe holds them: the second item of a tuple / list
    ``(inputs, targets, ...)``, or a mapping's ``targets`` / ``target`` / ``labels`` / ``label`` /
    ``y`` entry; None when there is no such tensor."""
    if isinstance(batch, Mapping):
        found = (batch.get(k) for k in TARGET_KEYS)
        return next((t for t in found if isinstance(t, Tensor)), None)
    if isinstance(batch, tuple | list) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return batch[1]
    return None


def _nth(optimizers: Any, i: int) -> Any:
    """The trainer's ``i``-th optimizer (None if it has fewer)."""
    return optimizers[i] if len(optimizers) > i else None


def _no_loss(outputs: Any, targets: Any) -> Tensor:  # never called: no probe without a loss
    raise RuntimeError("no loss function")


def _loader_batch(trainer: Any) -> int | None:
    """The training loader's batch size: one rank's micro-batch (or None)."""
    try:
        return loader_batch_size(trainer.train_dataloader)
    except Exception:
        return None


def _effective_batch(trainer: Any) -> int | None:
    """Examples per optimizer step: loader batch size × accumulation × world size (or None)."""
    bs = _loader_batch(trainer)
    try:
        return bs * int(trainer.accumulate_grad_batches) * int(trainer.world_size) if bs else None
    except Exception:
        return None
