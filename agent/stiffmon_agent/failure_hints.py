"""Why a measurement failed, where the exception alone does not say: hints for ``metric-error``.

A metric that raises is disabled for the rest of the run
(:meth:`~stiffmon_agent.runner.MeasurementRunner._disable`); torch's message is often about
autograd internals ("One of the differentiated Tensors does not require grad") and names
neither the cause in the user's model nor the fix. :func:`failure_hint` looks at the model once,
at that failure, for causes it can recognise and returns a sentence to append.

Reentrant checkpointing (``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)``, the old
default, and older Hugging Face ``gradient_checkpointing_enable()``'s) runs the checkpointed
block's forward under ``no_grad`` and replays it in ``backward()``: neither ``torch.autograd.grad``
(the sharpness's Hessian-vector products) nor the per-example gradients of the Gram can go
through it. It is recognised by a ``CheckpointFunctionBackward`` node in the autograd graph of
a forward of one probe example, run as the measurements run it (eval mode, nothing changed
afterwards). That is what the failed measurement saw: a model that checkpoints only in training
mode (Hugging Face's layers) does not checkpoint in the measurements, and is not blamed. A
checkpointed block none of whose inputs requires grad leaves no node (torch warns "None of the
inputs have requires_grad=True", and its weights get no gradient in training either): then
nothing fails, and its weights are measured as training sees them, with zero gradients.

Torch's messages for a missing second derivative ("derivative for
aten::multi_margin_loss_backward is not implemented", "the derivative for
'_embedding_bag_backward' is not implemented", a custom ``autograd.Function`` marked
``@once_differentiable``) name an internal op: :func:`double_backward_hint` names the op and the
module that runs it, and the way out. "element 0 of tensors does not require grad and does not
have a grad_fn" is looked into by :func:`graphless_hint`: a loss whose value for one example
alone does not depend on the parameters (in-batch mining returning a constant for a batch of
one) or one that never does. A loss that takes more than (outputs, targets)
(``GaussianNLLLoss(input, target, var)``) is named by :func:`loss_signature_note`, with the
callable to pass instead. batch_norm's "Expected more than 1 value per channel when training"
from a Gram is named by :func:`batch_statistics_layers`: a batch-norm layer without running
statistics cannot normalise an example alone, so the per-example gradients do not exist. A
model whose output for an example alone has another shape than in the probe batch (padding to
the batch's longest sequence) is named by
:func:`~stiffmon_agent.metrics.alone_output.alone_shape_hint`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from stiffmon_agent.metrics.alone_output import alone_shape_hint
from stiffmon_agent.metrics.gram.coupling import WAY_OUT
from stiffmon_agent.metrics.probe import (
    ForwardFn,
    LossFn,
    default_forward,
    inner_loss,
    loss_reduction,
    per_example_losses,
    take,
    unreduced,
)
from stiffmon_agent.metrics.state import measurement_mode
from stiffmon_agent.probe_set import ProbeSet

REENTRANT_HINT = (
    "the model uses reentrant torch.utils.checkpoint, which the {what} cannot go through: "
    "use use_reentrant=False"
)
_CHECKPOINT_NODE = "CheckpointFunctionBackward"
_MAX_NODES = 200_000  # a graph walk's bound (a forward of one example has far fewer nodes)


_NO_DOUBLE_BACKWARD = (  # torch's phrasings of a missing second derivative
    re.compile(r"derivative for (?:aten::)?(\w+?)(?:_backward)+ is not implemented"),
    re.compile(r"the derivative for '(\w+?)(?:_backward)+' is not implemented"),
)
_ONCE_DIFFERENTIABLE = "marked with @once_differentiable"
_GRAPHLESS = "does not require grad and does not have a grad_fn"
_ONE_VALUE = "Expected more than 1 value per channel when training"  # batch_norm's ValueError


def failure_hint(
    kind: str,
    model: nn.Module,
    probe: ProbeSet,
    forward: ForwardFn | None,
    exc: BaseException,
    loss_fn: LossFn | None = None,
) -> str | None:
    """A likely cause and fix of a measurement's failure ``exc``, or None if none is known.

    Args:
        kind: The failed metric (``gram``, ``sharpness``, ``density``).
        model: The (unwrapped) network.
        probe: The probe set the measurement used.
        forward: ``forward(model, inputs)`` or None.
        exc: What the measurement raised.
        loss_fn: The loss measured (the graph-less loss check needs it), or None.

    Returns:
        A sentence naming the cause and the way out, to lead the ``metric-error`` message, or
        None.
    """
    if isinstance(exc, TypeError) and loss_fn is not None:  # said in words already
        return loss_signature_note(loss_fn)
    if kind == "gram" and _ONE_VALUE in str(exc) and (layers := batch_statistics_layers(model)):
        return (
            f"batch normalisation without running statistics ({layers}) normalises over the "
            "batch and cannot take an example alone (one value per channel), as the "
            f"per-example gradients do: {WAY_OUT}"
        )
    if isinstance(exc, ValueError):  # a loss's shape check (binary_cross_entropy's …)
        return alone_shape_hint(model, probe.train()[0], forward)
    if not isinstance(exc, RuntimeError):  # autograd's errors (NotImplementedError too)
        return None
    text = str(exc)
    if "out of memory" in text.lower():  # not the graph's fault: no forward to look
        return None
    if (said := double_backward_hint(kind, text, model, loss_fn)) is not None:
        return said
    if uses_reentrant_checkpoint(model, probe, forward):
        what = "per-example gradients" if kind == "gram" else "Hessian-vector products"
        return REENTRANT_HINT.format(what=what)
    if _GRAPHLESS in text and loss_fn is not None:
        return graphless_hint(kind, model, probe, forward, loss_fn)
    return alone_shape_hint(model, probe.train()[0], forward)  # a shape that differs alone


def double_backward_hint(
    kind: str, text: str, model: nn.Module, loss_fn: LossFn | None = None
) -> str | None:
    """The sentence for an error ``text`` saying that torch has no second derivative of an op.

    The op is named as torch names it, without ``aten::`` and ``_backward`` (the second
    derivative is the derivative of its backward), with the module running it where one
    matches (the loss, or a layer of ``model``: ``multi_margin_loss`` is ``nn.MultiMarginLoss``).

    Args:
        kind: The failed metric.
        text: The error's message.
        model: The network (its layers are searched for the op's module).
        loss_fn: The loss, or None.

    Returns:
        The hint, or None if ``text`` is not about a missing second derivative.
    """
    found = next((m for pattern in _NO_DOUBLE_BACKWARD if (m := pattern.search(text))), None)
    if found is not None:
        op = found.group(1).lstrip("_")
        module = _module_of(op, model, loss_fn)
        what = f"{op} ({module})" if module else op
    elif _ONCE_DIFFERENTIABLE in text:
        what = "a custom autograd.Function marked @once_differentiable"
    else:
        return None
    if kind == "gram":  # the Gram needs first derivatives only: not expected, said plainly
        return f"torch has no second derivative for {what}"
    return (
        f"torch has no second derivative for {what}, which the Hessian measurements need: write "
        'it with plain differentiable ops or pass sharpness_every="never", '
        'density_every="never"; the Gram measurements are unaffected'
    )


def _module_of(op: str, model: nn.Module, loss_fn: LossFn | None) -> str | None:
    """``nn.<Name>`` of the loss or a layer whose class name is ``op`` without underscores
    (``multi_margin_loss``: ``MultiMarginLoss``; ``ctc_loss``: ``CTCLoss``), else None."""
    want = op.replace("_", "").lower()
    base = inner_loss(loss_fn)  # None without a loss
    candidates = [base] if base is not None else []
    candidates += list(model.modules())
    for m in candidates:
        name = type(m).__name__
        if name.lower() == want:
            prefix = "nn." if type(m).__module__.startswith("torch.nn") else ""
            return prefix + name
    return None


def graphless_hint(
    kind: str, model: nn.Module, probe: ProbeSet, forward: ForwardFn | None, loss_fn: LossFn
) -> str | None:
    """Why a loss has no gradient to take, where a probe loss has no ``grad_fn``.

    The loss of the first train example alone and that of the whole train probe are computed
    as the measurements compute them (:func:`measurement_mode`). An example alone without a
    graph while the probe has one: the loss couples the examples (in-batch mining, a
    contrastive loss returning a constant for a batch of one), and example i's own gradient,
    which the Gram needs, does not exist. Neither with a graph: the loss does not depend on the
    parameters at all (a value computed from detached outputs, through ``.item()`` or numpy).

    Args:
        kind: The failed metric.
        model: The network.
        probe: The probe set.
        forward: ``forward(model, inputs)`` or None.
        loss_fn: The loss as measured.

    Returns:
        The hint, or None where both losses have a graph (another cause) or cannot be computed.
    """
    x, y = probe.train()
    call = forward or default_forward
    loss = unreduced(loss_fn)
    try:
        with measurement_mode(model):
            one = per_example_losses(
                loss, call(model, take(x, slice(0, 1))), take(y, slice(0, 1)), 1
            )
            alone = one.requires_grad
            whole = per_example_losses(loss, call(model, x), y, probe.n_train).requires_grad
    except Exception:
        return None
    if not whole:
        return (
            "the probe loss has no gradient: loss_fn's value does not depend on the parameters "
            "(computed from detached outputs, through .item() or numpy?); return losses computed "
            "from the model's outputs with torch ops"
        )
    if alone:
        return None
    cause = (
        "the loss of an example alone has no gradient (for a batch of one its value does not "
        "depend on the parameters: in-batch mining, a loss that couples the examples)"
    )
    if kind == "gram":
        return f"{cause}, and {WAY_OUT}"
    return (
        f"{cause}, and the Hessian is taken over pieces of the probe (chunk_size=, or a rank's "
        "share), one of which has no gradient on its own: pass a chunk_size= of at least the "
        f"train probe's {probe.n_train} examples"
    )


def batch_statistics_layers(model: nn.Module) -> str:
    """The batch-norm layers of ``model`` without running statistics, which normalise with
    the batch's own mean and variance in eval mode too (``"'body.1' (BatchNorm1d), …"``), or
    "" if there are none."""
    found = [
        f"'{name}' ({type(m).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is None
    ]
    return ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")


def uses_reentrant_checkpoint(
    model: nn.Module, probe: ProbeSet, forward: ForwardFn | None = None
) -> bool:
    """Whether a measurement's forward of ``model`` goes through reentrant checkpointing.

    One probe example is passed forward in :func:`measurement_mode` (eval mode; buffers, RNG
    states and gradients as they were afterwards) and its outputs' autograd graph is searched
    for ``torch.utils.checkpoint``'s ``CheckpointFunctionBackward``. A forward that fails says
    False (the failure has another cause).

    Args:
        model: The (unwrapped) network.
        probe: The probe set.
        forward: ``forward(model, inputs)`` or None.

    Returns:
        True if the graph holds a reentrant checkpoint.
    """
    x, _ = probe.train()
    try:
        with measurement_mode(model):
            out = (forward or default_forward)(model, take(x, slice(0, 1)))
            return _has_node(_grad_fns(out), _CHECKPOINT_NODE)
    except Exception:
        return False


def _grad_fns(out: Any) -> Iterator[Any]:
    """The ``grad_fn`` of every tensor in a model's output (tensor, sequence, mapping)."""
    if isinstance(out, torch.Tensor):
        if out.grad_fn is not None:
            yield out.grad_fn
    elif isinstance(out, dict):  # also Hugging Face's ModelOutput
        for v in out.values():
            yield from _grad_fns(v)
    elif isinstance(out, tuple | list):
        for v in out:
            yield from _grad_fns(v)


def _has_node(roots: Iterator[Any], name: str) -> bool:
    """Whether the autograd graph under ``roots`` has a node whose class is named ``name``."""
    stack = list(roots)
    seen: dict[int, Any] = {}  # the nodes kept alive: an id is not reused during the walk
    while stack and len(seen) < _MAX_NODES:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        if type(node).__name__ == name:
            return True
        stack.extend(child for child, _ in getattr(node, "next_functions", ()))
    return False


def loss_inputs(loss_fn: LossFn) -> list[str] | None:
    """The required positional inputs of ``loss_fn`` where it needs more than the two the
    agent passes, ``loss_fn(outputs, targets)`` (``GaussianNLLLoss(input, target, var)``,
    ``TripletMarginLoss(anchor, positive, negative)``, ``MarginRankingLoss``,
    ``CosineEmbeddingLoss``, ``CTCLoss``); None where two (or ``*args``) do or the signature
    cannot be read. A module's ``forward`` is read, a :class:`PerExampleLoss`'s loss."""
    fn = inner_loss(loss_fn)
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(q.kind is q.VAR_POSITIONAL for q in params):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [q.name for q in params if q.kind in positional and q.default is q.empty]
    return required if len(required) > 2 else None


_CALLABLES = {  # a torch.nn loss of more inputs: the callable over the model's whole output
    "GaussianNLLLoss": (
        'F.gaussian_nll_loss(out[0], y, out[1]{opts}, reduction="none")',
        "(mean, var)",
        ("full", "eps"),
    ),
    "MarginRankingLoss": (
        'F.margin_ranking_loss(out[0], out[1], y{opts}, reduction="none")',
        "(x1, x2)",
        ("margin",),
    ),
    "CosineEmbeddingLoss": (
        'F.cosine_embedding_loss(out[0], out[1], y{opts}, reduction="none")',
        "(x1, x2)",
        ("margin",),
    ),
    "TripletMarginLoss": (
        'F.triplet_margin_loss(out[0], out[1], out[2]{opts}, reduction="none")',
        "(anchor, positive, negative)",
        ("margin", "p", "eps", "swap"),
    ),
    "CTCLoss": (  # targets (padded targets, input_lengths, target_lengths), batch-first
        'F.ctc_loss(out.transpose(0, 1), y[0], y[1], y[2]{opts}, reduction="none"){per_length}',
        "batch-first (N, T, C) log-probs, with probe targets (targets, input_lengths, "
        "target_lengths)",
        ("blank", "zero_infinity"),
    ),
}
CTC_PER_LENGTH = " / y[2].clamp_min(1)"
"""CTCLoss's "mean" divides each example's loss by its target length (at least 1) before the
batch mean: that quotient is the example's loss, not ``reduction="none"``'s own value."""


def loss_signature_note(loss_fn: LossFn) -> str | None:
    """Why ``loss_fn`` cannot be called as ``loss_fn(outputs, targets)`` and what to pass
    instead (:func:`loss_inputs`), or None where it can.

    For ``GaussianNLLLoss``, ``MarginRankingLoss``, ``CosineEmbeddingLoss``,
    ``TripletMarginLoss`` and ``CTCLoss`` the note gives the callable over the model's whole
    output, with the module's own non-default settings; it returns per-element losses
    (``reduction="none"``), whose objective is their mean (module docstring), or their sum where
    the module sums: then the callable must carry ``reduction = "sum"``. ``CTCLoss``'s mean is
    (1/N) Σ_i ℓ_i / max(|y_i|, 1) over the target lengths |y_i|, so its callable divides by
    them (:data:`CTC_PER_LENGTH`); ``reduction="none"`` alone (ℓ_i) measured Tr K 1.9× too
    large on a CTC model with target lengths 1..4.
    """
    inputs = loss_inputs(loss_fn)
    if inputs is None:
        return None
    fn = inner_loss(loss_fn)
    name = type(fn).__name__ if isinstance(fn, nn.Module) else getattr(fn, "__name__", "loss_fn")
    note = (
        f"loss_fn {name} takes {len(inputs)} inputs ({', '.join(inputs)}), but the agent calls "
        "loss_fn(outputs, targets) with the model's output and the probe's targets: pass a "
        "callable (outputs, targets) -> per-example losses instead"
    )
    known = _CALLABLES.get(name) if isinstance(fn, nn.Module) else None
    if known is not None and type(fn).__module__.startswith("torch.nn"):
        form, returns, settings = known
        default = type(fn)()
        opts = "".join(
            f", {k}={getattr(fn, k)!r}"
            for k in settings
            if getattr(fn, k, None) != getattr(default, k, None)
        )
        per_length = CTC_PER_LENGTH if name == "CTCLoss" and fn.reduction == "mean" else ""
        example = f"loss_fn=lambda out, y: {form.format(opts=opts, per_length=per_length)}"
        note += f", e.g. {example} for a model returning {returns}"
    else:
        note += ' (reduction="none")'
    if loss_reduction(loss_fn) == "sum":
        note += '; the loss sums over the batch: give the callable reduction = "sum"'
    return note
