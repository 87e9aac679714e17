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
there is no hint.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from stiffmon_agent.metrics.probe import ForwardFn, default_forward, take
from stiffmon_agent.metrics.state import measurement_mode
from stiffmon_agent.probe_set import ProbeSet

REENTRANT_HINT = (
    "the model uses reentrant torch.utils.checkpoint, which the {what} cannot go through: "
    "use use_reentrant=False"
)
_CHECKPOINT_NODE = "CheckpointFunctionBackward"
_MAX_NODES = 200_000  # a graph walk's bound (a forward of one example has far fewer nodes)


def failure_hint(
    kind: str, model: nn.Module, probe: ProbeSet, forward: ForwardFn | None, exc: BaseException
) -> str | None:
    """A likely cause and fix of a measurement's failure ``exc``, or None if none is known.

    Args:
        kind: The failed metric (``gram``, ``sharpness``, ``density``).
        model: The (unwrapped) network.
        probe: The probe set the measurement used.
        forward: ``forward(model, inputs)`` or None.
        exc: What the measurement raised.

    Returns:
        A sentence to append to the ``metric-error`` message, or None.
    """
    if not isinstance(exc, RuntimeError):  # autograd's errors are RuntimeErrors
        return None
    if "out of memory" in str(exc).lower():  # not the graph's fault: no forward to look
        return None
    if uses_reentrant_checkpoint(model, probe, forward):
        what = "per-example gradients" if kind == "gram" else "Hessian-vector products"
        return REENTRANT_HINT.format(what=what)
    return None


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
