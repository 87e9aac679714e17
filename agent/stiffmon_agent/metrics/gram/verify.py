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
while a mismatch is being confirmed), and only a mismatch that remains counts. Where the float32
single-example value itself is far off (an example fit to a loss of 1e-4), the fast path cannot
be held to 1e-4 either: it may be off by up to :data:`OWN_ROUNDING` times that error.

A few entries cannot see an error confined to the unchecked ones: a graph network for node
classification (``probe=(node_idx, y)``, ``forward=lambda m, i: m(x, adj)[i]``) whose layers see
the graph's N nodes as rows gives, at an isolated node, that node's own gradient, and elsewhere
a row's gradient that is not any example's (Tr K 60 % low with the first, middle and last nodes
isolated, no warning, before this check). So :func:`check_weighted_sum` also tests the whole
Gram through one weighted backward pass: for random signs v_i, vᵀGv = ‖Σ_i v_i g_i‖² =
‖∇ Σ_i v_i L_i‖², the gradient of a batch pass; rows that are not the examples break it.
"""

from __future__ import annotations

import copy
import math
import weakref

import torch
from torch import Tensor, nn

from stiffmon_agent.metrics.gram.loop import example_gradient
from stiffmon_agent.metrics.probe import (
    Batch,
    ForwardFn,
    LossFn,
    per_example_losses,
    take,
    to,
)

VERIFY_RTOL = {torch.float64: 1e-8, torch.float32: 1e-4}
RECHECK_MAX_PARAMS = 50_000_000
OWN_ROUNDING = 10.0
"""How many times the single-example error in the Gram's dtype a confirmed entry may be off."""
"""Largest model whose float32 mismatches are checked again in float64 (a 400 MB copy)."""


UNCONFIRMED = "not checked again in float64"


def mismatch_note(what: str, bad: str) -> str:
    """The warning for a fast path (``what``) whose entries ``bad`` (from :func:`check_entries`)
    are off: a layer's cause where float64 confirmed it, rounding as a possible one where it
    could not be checked."""
    if UNCONFIRMED in bad:
        cause = (
            "the rounding of the single-example gradients themselves (well-fit examples) may "
            "explain it, else some layer does not take examples along dim 0 or the model "
            "couples examples"
        )
    else:
        cause = "some layer does not take examples along dim 0 or the model couples examples"
    source = "a weighted batch pass" if bad.startswith("vᵀGv") else "single-example backward passes"
    return f"{what} disagrees with {source} ({bad}); {cause}. Using the exact per-example path."


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
    (below float64, one that float64 single-example gradients confirm; where the model cannot be
    checked in float64, the description says so, with :data:`UNCONFIRMED`).

    Confirmed in float64, an entry may still differ from the float64 value by up to
    :data:`OWN_ROUNDING` times the error of the same entry from single-example gradients in the
    Gram's own dtype: no computation in that dtype can be asked to do much better.
    """
    rtol = tolerance(total.dtype) if rtol is None else rtol
    first = _references(model, params, total.shape[0], inputs, targets, forward, loss_fn)
    bad = _mismatch(total, first, rtol)
    if bad is None or total.dtype == torch.float64:
        return bad
    if sum(p.numel() for p in params) > RECHECK_MAX_PARAMS:
        return f"{bad}; {UNCONFIRMED}: over {RECHECK_MAX_PARAMS:,} parameters"
    try:
        names = {id(q): name for name, q in model.named_parameters()}
        exact = copy.deepcopy(model).double()
        by_name = dict(exact.named_parameters())
        exact_params = [by_name[names[id(q)]] for q in params]
        refs = _references(
            exact,
            exact_params,
            total.shape[0],
            to(inputs, dtype=torch.float64),
            to(targets, dtype=torch.float64),
            forward,
            loss_fn,
        )
    except Exception as exc:  # not a model that runs in float64 (a loss with float32 weights …)
        why = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        return f"{bad}; {UNCONFIRMED}: the model does not run as a float64 copy ({why})"
    own = {ij: OWN_ROUNDING * abs(first[ij][0] - ref) for ij, (ref, _) in refs.items()}
    again = _mismatch(total, refs, rtol, own)
    return None if again is None else f"{again} (in float64)"


SUM_CHECK_EVERY = 10
"""The weighted-sum check (:func:`check_weighted_sum`, one more batch pass: ~40 % of a small
CNN's Gram) runs at a model's first fast Gram, every 10th after, and at every one once it has
failed for that model (its fast path is then wrong at every measurement)."""


class SumCheckSchedule:
    """When :func:`check_weighted_sum` is due for a model: at its first call, every
    :data:`SUM_CHECK_EVERY`-th after, and at every call once it has failed (per model, held
    weakly: a model that is gone leaves nothing behind)."""

    def __init__(self) -> None:
        self._state: weakref.WeakKeyDictionary[nn.Module, tuple[int, bool]] = (
            weakref.WeakKeyDictionary()
        )

    def due(self, model: nn.Module) -> bool:
        """Whether the check is due at this call for ``model``; counts the call."""
        count, failed = self._state.get(model, (0, False))
        self._state[model] = (count + 1, failed)
        return failed or count % SUM_CHECK_EVERY == 0

    def failed(self, model: nn.Module) -> None:
        """The check failed for ``model``: due at every call from now on."""
        count, _ = self._state.get(model, (0, False))
        self._state[model] = (count, True)


def check_weighted_sum(
    model: nn.Module,
    params: list[nn.Parameter],
    total: Tensor,
    inputs: Batch,
    targets: Batch,
    forward: ForwardFn,
    loss_fn: LossFn,
    chunk: int,
) -> str | None:
    r"""None if vᵀGv matches ‖∇ Σ_{i∈S} v_i L_i‖², else a description of the mismatch.

    S is the first ``chunk`` examples (one batch pass, no larger than the Gram's own) and v a
    fixed pseudo-random ±1 vector on S. With G[i, j] = g_i·g_j the identity is exact for
    per-example gradients g_i of losses that each depend on example i alone; the gap allowed
    is 10 × :func:`tolerance` × (Σ_{i∈S} √G_ii)², which bounds the rounding of both sides.
    """
    n = min(chunk, total.shape[0])
    gen = torch.Generator().manual_seed(0x5EED)
    v = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(total.device, torch.float64)
    x, y = take(inputs, slice(0, n)), take(targets, slice(0, n))
    losses = per_example_losses(loss_fn, forward(model, x), y, n)
    grads = torch.autograd.grad((losses * v.to(losses.dtype)).sum(), params, allow_unused=True)
    batch = sum(float(g.detach().double().square().sum()) for g in grads if g is not None)
    sub = total[:n, :n].detach().double()
    quad = float(v @ sub @ v)
    scale = float(sub.diagonal().clamp_min(0).sqrt().sum()) ** 2
    if abs(quad - batch) <= 10 * tolerance(total.dtype) * max(scale, 1e-300):
        return None
    return (
        f"vᵀGv = {quad:.6g} vs ‖∇Σ v_i L_i‖² = {batch:.6g} from a batch pass with random signs "
        f"v over the first {n} examples: the Gram's rows are not the examples' own gradients "
        "(a layer sees rows that are not the probe's examples, e.g. a graph's nodes for a "
        "probe of node indices)"
    )


def _references(
    model: nn.Module,
    params: list[nn.Parameter],
    n: int,
    inputs: Batch,
    targets: Batch,
    forward: ForwardFn,
    loss_fn: LossFn,
) -> dict[tuple[int, int], tuple[float, float]]:
    """(G_ij, √(G_ii G_jj)) from single-example backward passes (in float64 arithmetic for the
    dot products) at the checked entries: the diagonal at the first, middle and last example,
    and the entry between the first and the last."""
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
    out = {}
    for i, j in pairs:
        scale = math.sqrt(abs(float(grads[i] @ grads[i]) * float(grads[j] @ grads[j])))
        out[i, j] = (float(grads[i] @ grads[j]), scale)
    return out


def _mismatch(
    total: Tensor,
    refs: dict[tuple[int, int], tuple[float, float]],
    rtol: float,
    slack: dict[tuple[int, int], float] | None = None,
) -> str | None:
    """The first checked entry of ``total`` off its reference by more than ``rtol`` × its scale
    (or the entry's ``slack``, when larger)."""
    for (i, j), (ref, scale) in refs.items():
        got = float(total[i, j])
        if not math.isfinite(ref):
            continue
        allowed = max(rtol * max(scale, 1e-30), (slack or {}).get((i, j), 0.0))
        if abs(got - ref) > allowed:
            return f"G[{i},{j}] = {got:.6g} vs {ref:.6g} from single-example backward passes"
    return None
