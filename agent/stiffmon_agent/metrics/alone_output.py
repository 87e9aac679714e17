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

A loss that standardises over the batch breaks the same assumption through its value: a
policy-gradient loss ``-(Â * log π(a|s))`` with the advantages normalised inside ``loss_fn``,
Â = (A − mean(A)) / std(A), is finite on the probe but NaN for one example alone (the unbiased
std of one value is NaN), so the exact per-example paths give a Gram of NaNs, which read as a
diverging run. :func:`alone_loss_hint` finds an example whose loss is finite in the probe and not
alone, and says to normalise where the probe is built (the advantages are constants to the
optimizer: pass the normalised ones as targets).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from stiffmon_agent.metrics.probe import (
    Batch,
    ForwardFn,
    LossFn,
    batch_size,
    default_forward,
    per_example_losses,
    take,
    unreduced,
)
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


def alone_loss_hint(
    model: nn.Module, inputs: Batch, targets: Batch, loss_fn: LossFn, forward: ForwardFn | None
) -> str | None:
    """The sentence for a loss that is finite for every probe example in the probe but not for
    one example alone (L_i standardised over the batch); None where the probe's losses are not
    all finite (a diverged run), every example checked (the first :data:`MAX_EXAMPLES`) has a
    finite loss alone, or a forward fails.

    Args:
        model: The (unwrapped) network; run in the measurements' eval mode, without gradients.
        inputs: The train probe's inputs, examples along dim 0.
        targets: Its targets.
        loss_fn: The measured loss (a module or a per-example callable).
        forward: ``forward(model, inputs)`` or None for the default call.
    """
    run, fn, n = forward or default_forward, unreduced(loss_fn), batch_size(inputs)
    try:
        with measurement_mode(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's "std(): degrees of freedom is <= 0"
            whole = per_example_losses(fn, run(model, inputs), targets, n)
            if not bool(torch.isfinite(whole).all()):
                return None
            for i in range(min(n, MAX_EXAMPLES)):
                x, y = take(inputs, slice(i, i + 1)), take(targets, slice(i, i + 1))
                alone = per_example_losses(fn, run(model, x), y, 1)
                if not bool(torch.isfinite(alone).all()):
                    return _loss_sentence(i, float(alone[0]), float(whole[i]), n)
    except Exception:  # not this cause: the caller says what it knows
        return None
    return None


def _loss_sentence(i: int, alone: float, whole: float, n: int) -> str:
    return (
        f"probe example {i}'s loss is {alone:g} alone but {whole:.6g} among the probe's {n} "
        "examples: the loss normalises over the batch (advantages standardised by the batch's "
        "mean and std inside loss_fn: the std of one value is NaN), so an example alone, as its "
        "per-example gradient is taken, has no loss; the run is not diverging. Normalise where "
        "the probe is built and pass the normalised values as targets (probe=(states, (actions, "
        "(A - A.mean()) / A.std()))): to the optimizer they are constants, so the objective is "
        "the same"
    )
