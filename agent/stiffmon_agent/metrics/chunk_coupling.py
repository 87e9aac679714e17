r"""Is the chunked Hessian that of the probe? A check for losses that depend on the batch.

The Hessian-vector products run the probe in chunks of ``chunk_size`` examples,
H v = Σ_c (n_c / N) H_c v (:class:`~stiffmon_agent.metrics.sharpness.HessianOperator`). That is
the Hessian of the probe's objective (1/N) Σ_i L_i only where example i's loss does not depend
on which other examples share its batch. A model that couples the examples of a batch (a
mixture-of-experts layer whose experts take a limited number of tokens per batch and drop the
rest, BatchNorm without running statistics, in-batch negatives) has another objective on each
chunk, and λ1_H came out of the mean of the chunks' objectives without a word: 0.5 % low on a
capacity-limited top-2 MoE with 12 probe examples in chunks of 6 (0.38479 against the whole
probe's 0.38673), and by as much as the coupling is strong.

:func:`chunking_changes_losses` computes the per-example losses L_i twice, without gradients,
in the chunks the Hessian uses ([0, c), [c, 2c), ...) and in chunks shifted by half of one
([0, c/2), [c/2, 3c/2), ...), so that every example shares its pass with other examples; no pass
is larger than a chunk (the memory bound ``chunk_size`` exists for). Where the losses differ
beyond rounding, an example's loss depends on its batch and the chunked objective is not the
probe's. A forward or loss that draws random numbers in eval mode differs between any two
passes, coupled or not: the first chunk runs twice, and where its losses differ the check says
nothing about coupling (the Gram's ``gram-fallback`` warning names the random forward; the
Hessian uses one seeded draw per chunk, :mod:`~stiffmon_agent.metrics.pinned_rng`) unless the
draws escape the seeding (numpy, Python's ``random``, a generator of the script's own: two
seeded runs of the chunk differ): then it says that the Hessian is not of one objective. That
check runs whatever the chunking, one chunk included.

A loss with a stop-gradient is not the objective its optimizer descends. SimSiam's
−cos(p(x₁), sg(z(x₂))), a BYOL without a separate target network, a semi-gradient TD target
r + γ V(s').detach(), a straight-through estimator: the optimizer steps along
g(θ) = ∂₁f(θ, θ), the gradient of f(a, b) in its first argument with the detached copy b held
fixed, which is the gradient of no function. The step θ ← θ − η g(θ) is stable where η stays
under 2 / the top eigenvalue of its Jacobian J = ∂₁₁f + ∂₁₂f, while double backward gives
∂₁₁f only (the detached copy is a constant to autograd): λ1_H, the trace and the density are
those of the loss with the detached values frozen, and can be far from J's (6.32 against 0.21
on a toy SimSiam encoder). :func:`stop_gradient_note` finds such a loss: in one forward and loss
of a few probe examples, every ``detach()`` of a tensor that requires grad is replaced by a new
leaf of the same value, and where the loss has a gradient with respect to one of those leaves
that reaches the measured parameters through the detached tensor, the loss depends on a
stop-gradient of the parameters. (The per-example gradients ∂₁f_i are the optimizer's own:
stiffness and noise are unaffected. A detached output of a separate target network that the
optimizer does not hold, BYOL's EMA copy, does not reach the measured parameters and is not
flagged: with it fixed the Hessian is the step's Jacobian. A target computed under
``torch.no_grad()`` from the trained parameters is not seen.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from stiffmon_agent.metrics.pinned_rng import UNPINNED, cuda_devices, unpinned
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

ROUNDING = 1e3
"""Differences up to this many units of the losses' dtype's rounding (eps × max |L_i|) are
taken for rounding: 1.2e-4 relative in float32, 2.2e-13 in float64."""


def chunking_changes_losses(
    model: nn.Module,
    inputs: Batch,
    targets: Batch,
    loss_fn: LossFn,
    forward: ForwardFn | None,
    chunk_size: int | None,
) -> str | None:
    """A sentence saying how the chunks' per-example losses differ from the whole probe's, or
    None where they agree to rounding (or the probe is one chunk).

    Args:
        model: The network (run in the measurements' eval mode, without gradients where the
            passes do not need them).
        inputs: The train probe's inputs, examples along dim 0.
        targets: Its targets.
        loss_fn: The measured loss (a module or a per-example callable).
        forward: ``forward(model, inputs)`` or None.
        chunk_size: The examples per pass of the Hessian-vector products.
    """
    run = forward or default_forward
    fn = unreduced(loss_fn)
    for grad_mode in (False, True):  # with gradients where the loss differentiates its inputs
        try:
            with measurement_mode(model), torch.set_grad_enabled(grad_mode):
                return _compare(model, inputs, targets, fn, run, chunk_size)
        except Exception:  # the measurement's own passes fail the same way, and say why
            continue
    return None


def _compare(
    model: nn.Module,
    inputs: Batch,
    targets: Batch,
    fn: LossFn,
    run: ForwardFn,
    chunk_size: int | None,
) -> str | None:
    """The body of :func:`chunking_changes_losses`, in the grad mode it is called in."""
    n = batch_size(inputs)
    first = min(chunk_size or n, n)

    def chunk0() -> Tensor:
        return _losses(model, inputs, targets, fn, run, [0], first)

    once, again = chunk0(), chunk0()
    if _difference(once, again, first) is not None:  # a random forward or loss
        devices = cuda_devices([q for q in model.parameters() if q.requires_grad])
        return f"the probe's forward or loss {UNPINNED}" if unpinned(chunk0, devices) else None
    if not chunk_size or chunk_size >= n:
        return None
    aligned = _losses(model, inputs, targets, fn, run, range(0, n, chunk_size), n)
    half = max(1, chunk_size // 2)
    starts = [0, *range(half, n, chunk_size)]
    shifted = _losses(model, inputs, targets, fn, run, starts, n)
    return _difference(aligned, shifted, chunk_size)


def _losses(
    model: nn.Module,
    inputs: Batch,
    targets: Batch,
    fn: LossFn,
    run: ForwardFn,
    starts: Sequence[int] | range,
    n: int,
) -> Tensor:
    """The per-example losses, the probe run in passes from each of ``starts`` to the next."""
    ends = [*list(starts)[1:], n]
    parts = []
    for s, e in zip(starts, ends, strict=True):
        x, y = take(inputs, slice(s, e)), take(targets, slice(s, e))
        parts.append(per_example_losses(fn, run(model, x), y, e - s).detach())
    return torch.cat(parts)


def _difference(chunked: Tensor, shifted: Tensor, chunk_size: int) -> str | None:
    if not bool(torch.isfinite(chunked).all() and torch.isfinite(shifted).all()):
        return None  # a diverged probe is said elsewhere
    scale = float(chunked.abs().max().double()) if chunked.numel() else 0.0
    gap = float((chunked - shifted).abs().max().double()) if chunked.numel() else 0.0
    if gap <= ROUNDING * torch.finfo(chunked.dtype).eps * max(scale, 1e-30):
        return None
    n = chunked.numel()
    mean_a, mean_b = float(chunked.double().mean()), float(shifted.double().mean())
    return (
        f"the probe's per-example losses depend on the batch they are computed in (a layer or "
        f"loss that couples examples: capacity-limited experts, BatchNorm without running "
        f"statistics, in-batch negatives): in chunks of {chunk_size} and in the same chunks "
        f"shifted by half of one, an example's loss differs by up to {gap:.3g} (mean loss "
        f"{mean_a:.6g} against {mean_b:.6g}), "
        "so λ1_H, the trace and the density are those of the mean of the chunks' objectives, "
        f"not of the probe as one batch: pass chunk_size={n} (or None) to Agent to measure the "
        "whole probe in one pass. Stiffness and gradient noise are as uncertain: an example's "
        "gradient depends on the examples beside it (advantages normalised in loss_fn: "
        "normalise them where the probe is built)"
    )


STOP_GRADIENT_EXAMPLES = 8
"""Probe examples run by :func:`stop_gradient_note` (enough for an in-batch target)."""


class _DetachedLeaves(TorchFunctionMode):
    """Replaces each ``detach()`` of a tensor that requires grad by a fresh leaf of its value
    (which requires grad, so the loss's gradient with respect to it can be asked)."""

    def __init__(self) -> None:
        super().__init__()
        self.leaves: list[Tensor] = []
        self.sources: list[Tensor] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if (
            func in (Tensor.detach, torch.detach)
            and args
            and isinstance(args[0], Tensor)
            and args[0].requires_grad
            and isinstance(out, Tensor)
            and out.is_floating_point()
        ):
            out = out.clone().requires_grad_()  # a clone: in-place use leaves the input alone
            self.leaves.append(out)
            self.sources.append(args[0])
        return out


def stop_gradient_note(
    model: nn.Module,
    inputs: Batch,
    targets: Batch,
    loss_fn: LossFn,
    forward: ForwardFn | None,
    params: Sequence[Tensor] | None = None,
) -> str | None:
    """A sentence saying that the loss depends on a detached function of the parameters (so
    the measured Hessian is not the Jacobian of the optimizer's update), or None where it does
    not (or the check cannot run).

    Args:
        model: The network (run in the measurements' eval mode).
        inputs: The train probe's inputs, examples along dim 0.
        targets: Its targets.
        loss_fn: The measured loss (a module or a per-example callable).
        forward: ``forward(model, inputs)`` or None.
        params: The measured parameters (the optimizer's); None: every trainable one.
    """
    params = [q for q in model.parameters() if q.requires_grad] if params is None else params
    m = min(batch_size(inputs), STOP_GRADIENT_EXAMPLES)
    x, y = take(inputs, slice(0, m)), take(targets, slice(0, m))
    run, fn = forward or default_forward, unreduced(loss_fn)
    try:
        with measurement_mode(model):
            mode = _DetachedLeaves()
            with mode:
                loss = per_example_losses(fn, run(model, x), y, m).sum()
            if not mode.leaves or not loss.requires_grad:
                return None
            grads = torch.autograd.grad(loss, mode.leaves, allow_unused=True, retain_graph=True)
            used = [(s, g) for s, g in zip(mode.sources, grads, strict=True) if g is not None]
            if not used or not params:
                return None
            back = torch.autograd.grad(
                [s for s, _ in used], list(params), [g for _, g in used], allow_unused=True
            )
    except Exception:  # the measurement's own passes fail the same way, and say why
        return None
    if not any(b is not None and bool((b != 0).any()) for b in back):
        return None
    return (
        "the loss depends on a detached (stop-gradient) function of the parameters (a SimSiam "
        "or BYOL target from the trained network, a TD target r + γ V(s').detach(), a "
        "straight-through estimator): the optimizer's step is not the gradient of any "
        "objective, and λ1_H, the trace and the density are those of the loss with the detached "
        "values held fixed, not of the Jacobian of the step, whose top eigenvalue sets the "
        "stability threshold (the two can differ many-fold): the threshold does not bound this "
        "run's step. Stiffness and gradient noise (the per-example update directions) are right"
    )
