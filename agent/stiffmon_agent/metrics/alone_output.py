r"""Outputs whose shape depends on the rest of the batch: why example i alone cannot be measured.

The per-example gradients g_i = ∇L_i run each probe example alone (the exact per-example
loop, the safety net's single-example passes), and a chunked measurement runs slices of the
probe. Both assume that an example's output has the same shape, beyond the batch dimension,
whatever batch it is in. A model that pads to the longest sequence *of the batch* breaks this:
``pad_packed_sequence(packed, batch_first=True)`` without ``total_length=`` returns
(B, max_b len_b, H), so a tagger's (1, len_i, C) output for example i alone no longer lines up
with its (1, T) targets, and torch's error ("Expected target size [1, 2], got [1, 7]") names
neither the cause nor the fix. :func:`alone_shape_hint` looks for such an example when a
measurement fails and says so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from stiffmon_agent.metrics.probe import Batch, ForwardFn, batch_size, default_forward, take
from stiffmon_agent.metrics.state import measurement_mode

MAX_EXAMPLES = 64
"""Examples run alone, at most, in looking for one whose output has another shape."""


def _shapes(out: Any) -> list[tuple[int, ...]]:
    """The shapes of the output's tensors without their first (batch) dimension."""
    return [tuple(t.shape[1:]) for t in tree_leaves(out) if isinstance(t, Tensor) and t.dim()]


def alone_shape_hint(model: nn.Module, inputs: Batch, forward: ForwardFn | None) -> str | None:
    """The sentence for a model whose output for one example alone has another shape (beyond
    dim 0) than the same example's row of the output on all of ``inputs``; None if every example
    checked (the first :data:`MAX_EXAMPLES`) has the same shapes, or the forward fails.

    Args:
        model: The (unwrapped) network; run in the measurements' eval mode, without gradients.
        inputs: The train probe's inputs, examples along dim 0.
        forward: ``forward(model, inputs)`` or None for the default call.
    """
    run = forward or default_forward
    try:
        with measurement_mode(model), torch.no_grad():
            whole = _shapes(run(model, inputs))
            for i in range(min(batch_size(inputs), MAX_EXAMPLES)):
                alone = _shapes(run(model, take(inputs, slice(i, i + 1))))
                if alone != whole:
                    return _sentence(i, alone, whole, batch_size(inputs))
    except Exception:  # not this cause: the caller says what it knows
        return None
    return None


def _sentence(i: int, alone: list[tuple[int, ...]], whole: list[tuple[int, ...]], n: int) -> str:
    def fmt(shapes: list[tuple[int, ...]], rows: int | str) -> str:
        return ", ".join(str((rows, *s)) for s in shapes)

    return (
        f"the model's output for probe example {i} alone has shape {fmt(alone, 1)} but "
        f"{fmt(whole, n)} for the probe's {n} examples: its shape depends on the other examples "
        "of the batch (a sequence padded to the batch's longest, as pad_packed_sequence does "
        "without total_length=), so an example alone, as its per-example gradient is taken, "
        "does not line up with its targets; pad to the input's length instead "
        "(pad_packed_sequence(..., total_length=tokens.shape[1]))"
    )
