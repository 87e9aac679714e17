"""Hugging Face language models: which are causal (next-token shifted), and a step's loss over
gradient-accumulation micro-batches (used by :mod:`stiffmon_agent.integrations.transformers`).

* :func:`detect_causal_lm`: True / False / None (cannot tell) through compile, PEFT and DDP
  wrappers, from transformers' causal-LM class list, the ``loss_type`` and the config;
* :class:`StepLoss`: the model's own mean loss over an optimizer step's micro-batches, undoing
  the division by the step's ``num_items_in_batch`` where the model made it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon_agent.distributed import unwrap
from stiffmon_agent.metrics.probe import IGNORE_INDEX

log = logging.getLogger("stiffmon_agent")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel and ``torch.compile`` wrappers
    (:func:`~stiffmon_agent.distributed.unwrap`) and PEFT's (``get_base_model()``)."""
    for _ in range(4):
        model = unwrap(model)
        inner: Any = None
        if callable(getattr(model, "get_base_model", None)):
            try:
                inner = model.get_base_model()  # type: ignore[operator]
            except Exception:  # not PEFT's method after all
                inner = None
        if not isinstance(inner, nn.Module) or inner is model:
            break
        model = inner
    return model


def _auto_class_names(mapping: str) -> frozenset[str]:
    """The class names of one of transformers' auto mappings (empty when unavailable)."""
    try:
        from transformers.models.auto import modeling_auto
    except Exception:  # no mapping: the name rules only
        return frozenset()
    names: set[str] = set()
    for value in getattr(modeling_auto, mapping, {}).values():
        names.update([value] if isinstance(value, str) else value)
    return frozenset(names)


#: Loss types (``model.loss_type``) that transformers maps to its shifted causal-LM loss.
CAUSAL_LOSS_TYPES = frozenset({"ForCausalLM", "ForConditionalGeneration"})


def detect_causal_lm(model: nn.Module) -> bool | None:
    """Whether ``model`` is a causal language model (its logits at t predict token t + 1).

    True for a class in transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (``GPT2LMHeadModel``,
    ``…ForCausalLM``, …), a name ending in ``ForCausalLM``, a causal-LM ``loss_type`` or
    ``config.is_decoder``; False for encoder-decoder models (``config.is_encoder_decoder``: T5,
    BART, whose labels are not shifted), masked LMs and any other transformers head with a
    known loss; None when no rule applies (a model transformers does not know). Compiled, PEFT
    and DDP wrappers are looked through.
    """
    model = unwrap_model(model)
    name = type(model).__name__
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    if name.endswith("ForCausalLM") or name in _auto_class_names(
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"
    ):
        return True
    loss_type = getattr(model, "loss_type", None)
    if loss_type in CAUSAL_LOSS_TYPES or getattr(config, "is_decoder", False):
        return True
    if name.endswith("ForMaskedLM") or name in _auto_class_names(
        "MODEL_FOR_MASKED_LM_MAPPING_NAMES"
    ):
        return False
    if loss_type is not None:
        return False  # a transformers head whose loss is not the causal-LM one
    return None


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a causal language model (:func:`detect_causal_lm`; unknown: no)."""
    return bool(detect_causal_lm(model))


def label_targets(labels: Tensor, shift_labels: Any, causal: bool) -> Tensor:
    """The labels the model's loss compares with its logits, position by position."""
    if isinstance(shift_labels, Tensor):
        return shift_labels
    return labels[..., 1:] if causal and labels.dim() >= 2 else labels


def _micro_sum(logits: Tensor, targets: Tensor, causal: bool) -> tuple[Tensor, Tensor] | None:
    """(sum, count) of the cross-entropy over one micro-batch's targets, computed row by row
    (memory: one example's logits); None where the loss is not a cross-entropy over classes."""
    if targets.is_floating_point():
        return None
    if logits.dim() == 3 and targets.dim() == 2:
        if causal and targets.shape[1] == logits.shape[1] - 1:
            logits = logits[:, :-1]
        if logits.shape[:2] != targets.shape:
            return None
        total = logits.new_zeros((), dtype=torch.float32)
        for row, tgt in zip(logits, targets, strict=True):
            total = total + F.cross_entropy(
                row.float(), tgt.to(row.device), ignore_index=IGNORE_INDEX, reduction="sum"
            )
    elif logits.dim() == 2 and targets.dim() == 1 and logits.shape[0] == targets.shape[0]:
        total = F.cross_entropy(
            logits.float(), targets.to(logits.device), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    else:
        return None
    return total, targets.ne(IGNORE_INDEX).sum().to(total.device)


class StepLoss:
    """The step's training loss from the model's loss on each micro-batch.

    When the Trainer passes ``num_items_in_batch`` N (the whole step's target count) to a model
    whose loss divides by it, micro-batch i reports ``S_i / N`` (``S_i`` its summed loss) and the
    step's loss is ``Σ S_i / Σ n_i``, with ``n_i`` the micro-batch's target count (next tokens for
    a causal LM): the model's own mean over the step, whatever N counted. Otherwise (no N, or a
    model that ignores it) each micro-batch reports its mean loss and the step's loss is their
    mean. Which of the two a model does is measured once, on the first micro-batch where they
    differ (n ≠ N), by computing its cross-entropy from the logits (no grad, row by row); until
    then (or where it cannot be told) the step's loss is what the Trainer computes: the sum of
    the micro-batch losses when N was passed.
    """

    TRIES = 4  # micro-batches looked at (each costs a host sync) before giving up

    def __init__(self, causal: bool, note: Any = None) -> None:
        self.causal = causal
        self.normalised: bool | None = None  # does the model divide by num_items_in_batch?
        self.note = note  # called once with a warning message
        self._tries = 0
        self._warned = False
        self._parts: list[tuple[Tensor, Tensor | None, Tensor | None]] = []

    def add(self, loss: Tensor, kwargs: Mapping[str, Any], logits: Any) -> None:
        """One micro-batch: its loss, the model's keyword arguments, its logits."""
        loss = loss.detach().float()
        if loss.numel() != 1:
            loss = loss.mean()
        n_items = kwargs.get("num_items_in_batch")
        labels = kwargs.get("labels")
        if n_items is None or not isinstance(labels, Tensor):
            self._parts.append((loss, None, None))
            return
        targets = label_targets(labels, kwargs.get("shift_labels"), self.causal)
        if targets.is_floating_point():  # MSE / BCE: means, transformers ignores the count
            self._parts.append((loss, None, None))
            return
        n_items = torch.as_tensor(n_items, device=loss.device).float().reshape(-1)[0]
        count = targets.ne(IGNORE_INDEX).sum().to(loss.device).float()
        if self.normalised is None and self._tries < self.TRIES and isinstance(logits, Tensor):
            self._tries += 1
            self._calibrate(loss, float(n_items), float(count), logits.detach(), targets)
        self._parts.append((loss, n_items, count))

    def _calibrate(
        self, loss: Tensor, n_items: float, count: float, logits: Tensor, targets: Tensor
    ) -> None:
        if count < 1 or n_items <= 0 or abs(count - n_items) < 0.5:
            return  # no targets, or both readings give the same value
        with torch.no_grad():
            res = _micro_sum(logits, targets, self.causal)
        if res is None:
            self._tries = self.TRIES
            return
        total = float(res[0])
        value, mean, share = float(loss), total / count, total / n_items
        self.normalised = abs(value - share) < abs(value - mean)
        if min(abs(value - share), abs(value - mean)) > 1e-2 * max(abs(mean), 1e-6):
            self.normalised = None  # neither: the model's loss is not this cross-entropy
            self._tries = self.TRIES
            self._warn(
                f"the model's training loss ({value:.6g}) is neither the mean cross-entropy of "
                f"its micro-batch ({mean:.6g}) nor that sum over the step's {n_items:.0f} "
                f"targets ({share:.6g}): the step's loss is recorded as the Trainer computes it, "
                "and the agent's per-example loss may differ from the model's (pass loss_fn=)"
            )

    def _warn(self, message: str) -> None:
        if self._warned:
            return
        self._warned = True
        log.warning("stiffmon: %s", message)
        if self.note is not None:
            self.note(message)

    def take(self) -> Tensor | float:
        """The step's loss (NaN when no micro-batch loss was seen); resets for the next step."""
        parts, self._parts = self._parts, []
        if not parts:
            return math.nan
        losses = torch.stack([p[0] for p in parts])
        if self.normalised is False or all(p[1] is None for p in parts):
            return losses.mean()  # micro-batch means: their mean
        if self.normalised is None or any(p[1] is None for p in parts):
            return losses.sum()  # the Trainer's reading: shares of the step's loss
        n_items = torch.stack([p[1] for p in parts])  # type: ignore[misc]
        counts = torch.stack([p[2] for p in parts])  # type: ignore[misc]
        return (losses * n_items).sum() / counts.sum().clamp(min=1.0)
