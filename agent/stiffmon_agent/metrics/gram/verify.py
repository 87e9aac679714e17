r"""The safety net: entries of a fast Gram against single-example backward passes.

Layers used with the batch in another dimension (a sequence-first Linear with T = N), modules
that couple the examples of a batch, or a rule's bug make the fast Gram wrong while its shapes
look right. Checking G[0, 0] alone misses errors confined to other examples or to the
off-diagonal, so this checks the diagonal at up to three examples (first, middle, last) and the
off-diagonal entry between the first and the last, each to a relative tolerance (off-diagonal
entries relative to √(G_ii G_jj)) set by the dtype: 1e-8 in float64, 1e-4 in float32 (the
fast path's own rounding is ~1e-6 there), 1e-2 below. A small layer used wrongly (a positional
``Embedding`` called on ``arange(T)`` with T = N looks per-example) changes G by less than 1e-3.

The single-example reference has rounding of its own, and below float64 it can be the worse of
the two: a well-fit example's loss gradient is a difference of nearly equal numbers (1 − p_y
for cross-entropy), so at a loss of 1e-3 its float32 G_ii was 1.4e-4 off the float64 value while
the fast path's was 1.7e-5 off (a plain MLP, reported as a layer "that couples examples"). So a
mismatch found below float64 is checked again against float64 single-example gradients (a
float64 copy of the model, up to :data:`RECHECK_MAX_PARAMS` parameters; the copy only exists
while a mismatch is being confirmed), and only a mismatch that remains counts.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from stiffmon_agent.metrics.gram.loop import example_gradient
from stiffmon_agent.metrics.probe import Batch, ForwardFn, LossFn, take, to

VERIFY_RTOL = {torch.float64: 1e-8, torch.float32: 1e-4}
RECHECK_MAX_PARAMS = 50_000_000
"""Largest model whose float32 mismatches are checked again in float64 (a 400 MB copy)."""


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the check for a Gram of this dtype."""
    return VERIFY_RTOL.get(dtype, 1e-2)


def check_entries(
    model: nn.Module,
    params: list[nn.Parameter],
    total: Tensor,
    inputs: Batch,
    targets: Batch,
    forward: ForwardFn,
    loss_fn: LossFn,
    rtol: float | None = None,
) -> str | None:
    """None if the checked entries of ``total`` match, else a description of the first mismatch
    (below float64, one that float64 single-example gradients confirm)."""
    rtol = tolerance(total.dtype) if rtol is None else rtol
    bad = _mismatch(model, params, total, inputs, targets, forward, loss_fn, rtol)
    if bad is None or total.dtype == torch.float64:
        return bad
    if sum(p.numel() for p in params) > RECHECK_MAX_PARAMS:
        return bad
    try:
        names = {id(q): name for name, q in model.named_parameters()}
        exact = copy.deepcopy(model).double()
        by_name = dict(exact.named_parameters())
        exact_params = [by_name[names[id(q)]] for q in params]
        again = _mismatch(
            exact,
            exact_params,
            total,
            to(inputs, dtype=torch.float64),
            to(targets, dtype=torch.float64),
            forward,
            loss_fn,
            rtol,
        )
    except Exception:  # not a model that runs in float64 (a loss with float32 weights ...)
        return bad
    return None if again is None else f"{again} (in float64)"


def _mismatch(
    model: nn.Module,
    params: list[nn.Parameter],
    total: Tensor,
    inputs: Batch,
    targets: Batch,
    forward: ForwardFn,
    loss_fn: LossFn,
    rtol: float,
) -> str | None:
    n = total.shape[0]
    idx = sorted({0, n // 2, n - 1})
    grads = {
        i: example_gradient(
            model,
            params,
            take(inputs, slice(i, i + 1)),
            take(targets, slice(i, i + 1)),
            forward,
            loss_fn,
        )
        .detach()
        .double()
        for i in idx
    }
    pairs = [(i, i) for i in idx] + ([(idx[0], idx[-1])] if len(idx) > 1 else [])
    for i, j in pairs:
        ref = float(grads[i] @ grads[j])
        got = float(total[i, j])
        scale = math.sqrt(abs(float(grads[i] @ grads[i]) * float(grads[j] @ grads[j])))
        if not math.isfinite(ref):
            continue
        if abs(got - ref) > rtol * max(scale, 1e-30):
            return f"G[{i},{j}] = {got:.6g} vs {ref:.6g} from single-example backward passes"
    return None
