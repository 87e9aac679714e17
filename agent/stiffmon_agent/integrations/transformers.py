"""Hugging Face ``Trainer`` callback: the agent on the Trainer's model and optimizer.

.. code-block:: python

    from stiffmon_agent.integrations.transformers import StiffmonCallback

    cb = StiffmonCallback(probe=probe_batch, run="bert lr=5e-5", record="bert.stiff")
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()

``probe`` (and ``val_probe``) is a batch as the model takes it: a dict of tensors with a
``labels`` entry (what a data collator returns), or ``(inputs_dict, labels)``. The model is
called as ``model(**inputs).logits`` (``forward=`` overrides that) and, unless ``loss_fn=`` is
given, the loss is the model's own, per example: what ``…ForSequenceClassification`` computes
for its ``config.problem_type`` (cross-entropy, MSE or BCE-with-logits), and token-level
cross-entropy (ignoring label −100, shifted by one token for causal language models) for
per-token labels, each example's sum over its tokens divided by the probe's mean token count per
example (the model's loss divides by the batch's token count: :class:`ModelLoss`).

The agent is built at ``on_train_begin`` on the world's main process only (multi-GPU: rank 0
publishes) and stepped at ``on_step_end``, which the Trainer calls once per optimizer step, after
all gradient-accumulation micro-batches. The step's loss is the model's own mean loss over the
step's micro-batches, from their training losses (``outputs.loss``) caught with a forward hook:
the token mean over the step where the Trainer passes ``num_items_in_batch`` and the model divides
by it, else the mean of the micro-batch losses (see :class:`StepLoss`); the accuracy counts the
predictions of all the step's micro-batches (:func:`accuracy_pair`: per example for
classifiers, per token for language models). Causal LMs are recognised by
:func:`detect_causal_lm` (a warning event where it cannot tell). Under ``bf16=True`` /
``fp16=True`` the measurements run the model in its weights' dtype (its own ``forward``, not
accelerate's autocast wrapper: :func:`~stiffmon_agent.metrics.state.measurement_mode`).
The agent is closed at ``on_train_end``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon_agent.agent import Agent
from stiffmon_agent.announce import count_weighting_event
from stiffmon_agent.integrations._common import (
    StepAccuracy,
    build_agent,
    check_options,
    check_probe_class_target,
    follow_optimizer,
    unwrap_optimizer,
)
from stiffmon_agent.integrations.hf_lm import (
    StepLoss,
    detect_causal_lm,
    is_causal_lm,  # noqa: F401  (public here since the first release)
    label_targets,
    unwrap_model,
)
from stiffmon_agent.probe_set import CountWeighting

try:
    from transformers import TrainerCallback
except ImportError as exc:
    raise ImportError(
        'the Hugging Face integration needs transformers: pip install "stiffmon[transformers]"'
    ) from exc

log = logging.getLogger("stiffmon_agent")


#: Model types whose default position ids are 0 … T−1 for every example (learned absolute
#: position embeddings). RoBERTa-style models derive them from the padding instead.
ARANGE_POSITIONS = frozenset({"bert", "electra", "albert", "megatron-bert", "gpt2", "gpt_neo"})


def logits_forward(model: nn.Module, inputs: Any) -> Tensor:
    """``model(**inputs).logits`` (``model(inputs).logits`` for a tensor).

    For the model types in :data:`ARANGE_POSITIONS`, the default ``position_ids`` (0 … T−1 for
    every example) are passed explicitly, so the position embedding sees batch-first indices and
    its per-example gradients take the fast path instead of ``vmap`` (which cannot run through
    the data-dependent mask checks of some models).
    """
    if isinstance(inputs, Mapping):
        ids = inputs.get("input_ids")
        model_type = getattr(getattr(model, "config", None), "model_type", "")
        if (
            model_type in ARANGE_POSITIONS
            and isinstance(ids, Tensor)
            and ids.dim() == 2
            and "position_ids" not in inputs
        ):
            pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
            inputs = {**inputs, "position_ids": pos}
        out = model(**inputs)
    else:
        out = model(inputs)
    return out.logits if hasattr(out, "logits") else out[0]


class ModelLoss:
    """The model's own training loss, one value per example.

    For ``(N, C)`` logits, by ``config.problem_type`` (inferred as Hugging Face does when
    unset: regression for one label, single-label classification for integer labels, else
    multi-label): ``CE(logits_i, y_i)``, ``MSE(logits_i, y_i)`` or ``mean_c BCE(logits_ic,
    y_ic)``. For ``(N, T, V)`` logits with ``(N, T)`` labels, with logits shifted (position t
    predicts token t + 1) for causal LMs: ``Σ_t CE(logits_it, y_it) / c̄`` over the positions
    with y_it ≠ −100 once :meth:`count_over` has set ``count_mean`` = c̄, the probe's mean count
    of such positions per example (the model's loss divides by the batch's count of them, so the
    mean of these over a batch is the model's own loss on it); before: each example's own mean
    over them.
    """

    def __init__(
        self, config: Any = None, causal: bool = False, count_mean: float | None = None
    ) -> None:
        self.problem_type = getattr(config, "problem_type", None)
        self.num_labels = int(getattr(config, "num_labels", 0) or 0)
        self.causal = causal
        self.count_mean = count_mean

    def counts(self, labels: Tensor) -> Tensor:
        """Per example of ``(N, T)`` token labels: the positions the loss counts (labels not
        −100, after the causal shift)."""
        kept = labels[:, 1:] if self.causal else labels
        return (kept != -100).sum(dim=1)

    def count_over(self, labels: Any) -> CountWeighting | None:
        """Set ``count_mean`` c̄ from the train probe's ``(N, T)`` token ``labels``: the mean
        count per example over the examples the agent keeps (those with a label not −100), so
        that the probe mean of the per-example losses is the model's loss on the probe. None
        (nothing set) for other labels, or when every example counts as many positions (each
        example's own mean is then the same)."""
        if not (isinstance(labels, Tensor) and labels.dim() == 2) or labels.is_floating_point():
            return None
        counts = self.counts(labels).double()[(labels != -100).any(dim=1)]
        if not counts.numel() or bool((counts == counts[0]).all()) or not counts.sum() > 0:
            return None
        info = CountWeighting.of(counts, per_element=True, class_weights=False)
        self.count_mean = info.mean
        return info

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        if logits.dim() == 3 and labels.dim() == 2:
            if self.causal:
                logits, labels = logits[:, :-1], labels[:, 1:]
            tok = F.cross_entropy(
                logits.transpose(1, 2), labels, ignore_index=-100, reduction="none"
            )
            valid = (labels != -100).to(tok.dtype)
            total = (tok * valid).sum(dim=1)
            if self.count_mean is not None:  # the batch's count divides (Hugging Face's loss)
                return total / self.count_mean
            return total / valid.sum(dim=1).clamp(min=1.0)
        problem = self.problem_type
        if problem is None:
            if self.num_labels == 1 or logits.shape[-1] == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            n = logits.shape[0]
            return F.mse_loss(
                logits.reshape(n, -1).float(), labels.reshape(n, -1).float(), reduction="none"
            ).mean(dim=1)
        if problem == "single_label_classification":
            return F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
            )
        return F.binary_cross_entropy_with_logits(
            logits, labels.to(logits.dtype), reduction="none"
        ).mean(dim=1)


def split_labels(batch: Any) -> Any:
    """``{..., "labels": y}`` → ``({...}, y)``; anything else is returned as is."""
    if isinstance(batch, Mapping) and "labels" in batch:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"]
    return batch


NO_ACCURACY = (
    "no accuracy: the model's training outputs have no class logits with integer labels "
    "(one per example, or per token) to count"
)


def accuracy_pair(
    logits: Tensor, labels: Tensor, shift_labels: Any, causal: bool
) -> tuple[Tensor, Tensor] | None:
    """The logits and targets a micro-batch's accuracy compares, or None (no class labels).

    ``(N, C)`` logits with ``(N,)`` labels (sequence classification), and ``(N, T, V)`` logits
    with ``(N, T)`` token labels, shifted for causal LMs (position t predicts token t + 1, or
    against the model's ``shift_labels``) as the model's loss compares them; labels −100 are
    no predictions.
    """
    if labels.is_floating_point():
        return None  # regression, multi-label
    if logits.dim() == 2 and labels.dim() == 1:
        return logits, labels
    if logits.dim() == 3 and labels.dim() == 2:
        targets = label_targets(labels, shift_labels, causal)
        if causal and targets.shape[1] == logits.shape[1] - 1:
            logits = logits[:, :-1]
        return logits, targets
    return None


class ForwardTap:
    """The callback's forward hook on the model. Deep copies of the model (the agent's float64
    check of the per-example Gram copies it) get a hook that does nothing: a copy's forward
    passes are no training, and the callback (which holds the agent, its threads and locks)
    cannot be copied."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __deepcopy__(self, memo: dict[int, Any]) -> ForwardTap:
        return ForwardTap(_ignore)


def _ignore(*args: Any) -> None:
    return None


class StiffmonCallback(TrainerCallback):  # type: ignore[misc]
    """Attach a stiffmon :class:`~stiffmon_agent.Agent` to a Hugging Face ``Trainer``.

    Args:
        loss_fn: Per-example loss ``loss_fn(logits, labels)``. Default: the model's own loss
            (:class:`ModelLoss`).
        **options: Any keyword option of :class:`~stiffmon_agent.Agent`: ``probe``,
            ``val_probe``, ``run``, ``endpoint``, ``record``, ``class_names``, ``forward``
            (default ``model(**inputs).logits``), ``gram_every``, ``sharpness_every``, …
            (``batch_size`` defaults to per-device batch × accumulation × world size;
            ``class_names`` to the model's ``config.id2label``).

    Raises:
        TypeError: An option :class:`~stiffmon_agent.Agent` does not take.
    """

    def __init__(self, loss_fn: Any = None, **options: Any) -> None:
        self.loss_fn = loss_fn
        self.options = check_options(options)
        for key in ("probe", "val_probe"):
            if self.options.get(key) is not None:
                self.options[key] = split_labels(self.options[key])
        check_probe_class_target(self.options)  # on the split probe: (inputs, labels)
        self.agent: Agent | None = None
        self._loss = StepLoss(causal=False)
        self._accuracy = StepAccuracy()
        self._causal = False
        self._hook: Any = None
        self._optimizer: Any = None  # the Trainer's optimizer the agent reads, as it holds it

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.agent is not None or not state.is_world_process_zero:
            return
        model: nn.Module = kwargs["model"]
        self._optimizer = kwargs.get("optimizer")
        optimizer = unwrap_optimizer(self._optimizer)
        config = getattr(unwrap_model(model), "config", None)
        causal = detect_causal_lm(model)
        loss_fn = (
            self.loss_fn if self.loss_fn is not None else ModelLoss(config, causal=bool(causal))
        )
        probe = self.options.get("probe")
        labels = probe[1] if isinstance(probe, tuple) and len(probe) == 2 else None
        weighting = loss_fn.count_over(labels) if isinstance(loss_fn, ModelLoss) else None
        id2label = getattr(config, "id2label", None) or {}
        names = [str(id2label[i]) for i in sorted(id2label)] if id2label else None
        options = {**self.options, "forward": self.options.get("forward") or logits_forward}
        defaults: dict[str, Any] = {
            "batch_size": int(args.per_device_train_batch_size)
            * int(args.gradient_accumulation_steps)
            * int(getattr(args, "world_size", 1) or 1),
        }
        if names and self.options.get("probe") is not None:
            defaults["class_names"] = names
        self.agent = build_agent(
            model,
            loss_fn,
            optimizer,
            options,
            start_step=int(state.global_step),
            defaults=defaults,
        )
        agent = self.agent
        agent.no_accuracy_note = NO_ACCURACY
        self._causal = bool(causal)
        self._loss = StepLoss(bool(causal), note=lambda m: agent.event("step-loss", m, "warning"))
        self._accuracy = StepAccuracy()
        if weighting is not None:
            code, message, attrs = count_weighting_event(weighting)
            agent.event(code, message, **attrs)
        if (
            causal is None
            and self.loss_fn is None
            and isinstance(labels, Tensor)
            and labels.dim() >= 2
            and not labels.is_floating_point()
        ):
            message = (
                f"cannot tell whether {type(unwrap_model(model)).__name__} is a causal language "
                "model: its token labels are taken unshifted (logits at t against label t); for "
                "next-token prediction pass loss_fn=ModelLoss(model.config, causal=True)"
            )
            log.warning("stiffmon: %s", message)
            agent.event("causal-lm-unknown", message, "warning")
        self._hook = model.register_forward_hook(ForwardTap(self._on_forward), with_kwargs=True)

    def _on_forward(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """Catch the training loss, and class logits with their labels, of each micro-batch."""
        if not module.training or not torch.is_grad_enabled():
            return  # evaluation, or the agent's own measurements
        loss = getattr(output, "loss", None)
        logits, labels = getattr(output, "logits", None), kwargs.get("labels")
        if isinstance(loss, Tensor):
            self._loss.add(loss, kwargs, logits)
        if isinstance(logits, Tensor) and isinstance(labels, Tensor):
            pair = accuracy_pair(logits, labels, kwargs.get("shift_labels"), self._causal)
            if pair is not None:
                self._accuracy.add(*pair)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.agent is None:
            return
        if (now := kwargs.get("optimizer")) is not None:  # replaced since?
            self._optimizer = follow_optimizer(self.agent, self._optimizer, now)
        self.agent.step(self._loss.take(), *self._accuracy.take())

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.agent is not None:
            self.agent.close()
            self.agent = None
