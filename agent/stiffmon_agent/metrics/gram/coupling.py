r"""Whether each example's loss depends on that example alone, as a per-example gradient needs.

The exact paths (``vmap(grad)`` and the loop) compute g_i = ∇L_i from example i alone. A loss
that couples the examples of a batch gives something else there: InfoNCE / contrastive losses
(example i's loss is a softmax over the other examples: alone it is 0, and so is g_i), or a
``BatchNorm`` without running statistics (it normalises over the batch even in eval mode). Then
stiffness and gradient noise, which are defined through each example's own gradient, do not
exist, and a Gram of batch-of-one gradients is silently wrong.

The check: if every L_i depends on example i alone, the g_i add up to the gradient of Σ_i L_i
taken over the probe's chunks, ĝ (one backward pass per chunk). The Gram gives
‖Σ_i g_i‖ = √(1ᵀ G 1) without the vectors, and by the triangle inequality
| ‖ĝ‖ − √(1ᵀG1) | ≤ ‖ĝ − Σ_i g_i‖, which rounding keeps within a small multiple of the
working precision times Σ_i ‖g_i‖ = Σ_i √G_ii. A larger gap means coupled losses. (The check
can miss a coupling that happens to leave the sum's norm alone; it never flags an uncoupled
loss beyond rounding.)

g_i stays what it is defined as, example i's gradient on its own (as the tests' float64
reference loop computes it), and a note says the losses are coupled. Where every example-alone
gradient vanishes while the summed loss has a gradient (InfoNCE), there is nothing to measure:
the Gram is refused. A forward or loss that is random in eval mode (``F.dropout(x, p,
training=True)``, noise not gated on ``self.training``, random projections drawn in a sliced
score-matching loss) fails the check too, each pass drawing anew: where two passes of one probe
example (forward and loss) differ, the note says that instead, and where two passes with
torch's generators seeded alike differ too (numpy or Python ``random`` draws, which the
Hessian's seeding does not fix), that the sharpness is not of one objective either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from stiffmon_agent.metrics.gram.verify import tolerance
from stiffmon_agent.metrics.pinned_rng import UNPINNED, cuda_devices, unpinned
from stiffmon_agent.metrics.probe import Batch, ForwardFn, LossFn, per_example_losses, take

SLACK = 10.0
"""The gap allowed, in multiples of the entry check's tolerance (1e-3 in float32, 1e-7 in
float64), relative to Σ_i ‖g_i‖."""


WAY_OUT = (
    "stiffness and gradient noise need each example's loss to depend on that example alone: "
    'pass gram_every="never" (sharpness, the Hessian trace and density still work)'
)
"""What a loss whose examples' losses are not their own is told to do (also by
:mod:`~stiffmon_agent.failure_hints`)."""


def coupled(
    model: nn.Module,
    params: list[nn.Parameter],
    total: Tensor,
    inputs: Batch,
    targets: Batch,
    forward: ForwardFn,
    loss_fn: LossFn,
    n: int,
    chunk: int,
) -> str | None:
    """A note if the per-example losses are coupled across examples, or None if the Gram
    ``total`` of example-alone gradients adds up to the gradient of the summed losses.

    Raises:
        ValueError: If every example-alone gradient vanishes while the summed loss has a
            gradient (an in-batch contrastive loss: alone, each example's loss is constant).
    """
    summed = [torch.zeros_like(q) for q in params]
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        x, y = take(inputs, slice(start, stop)), take(targets, slice(start, stop))
        loss = per_example_losses(loss_fn, forward(model, x), y, stop - start).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for s, g in zip(summed, grads, strict=True):
            if g is not None:
                s.add_(g.detach())
    batch = math.sqrt(sum(float(s.double().square().sum()) for s in summed))
    apart = math.sqrt(max(float(total.double().sum()), 0.0))
    scale = float(total.double().diagonal().clamp_min(0).sqrt().sum())
    rtol = SLACK * tolerance(total.dtype)
    if abs(batch - apart) <= rtol * scale or batch == apart:
        return None
    if scale <= rtol * batch:
        raise ValueError(
            "the per-example losses are coupled across examples: each example's loss on its "
            f"own has no gradient, the summed probe losses have one of norm {batch:.4g} (an "
            f"in-batch contrastive / InfoNCE loss?). {WAY_OUT[:1].upper()}{WAY_OUT[1:]}"
        )
    if (found := _random(model, params, inputs, targets, forward, loss_fn)) is not None:
        if found.buffers:
            names = found.buffers
            return (
                f"the model's buffer{'s' if len(names) > 1 else ''} {', '.join(names[:3])} "
                "change in every forward in eval mode (a running statistic or counter updated "
                "whatever self.training is), so each of the Gram's per-example passes sees "
                "other values and the example-alone gradients do not add up to the probe's "
                "(nor is the objective one function of the weights). Update them only in "
                "training mode (if self.training: ...)"
            )
        if found.unpinned:
            return (
                "the model's forward is random in eval mode (or its loss), so the Gram's "
                "per-example passes draw anew and the example-alone gradients do not add up to "
                "the probe's; "
                f"and it {UNPINNED}"
            )
        return (
            "the model's forward is random in eval mode (two passes of one probe example, "
            "forward and loss, differ: dropout called with training=True, noise not gated on "
            "self.training, a diffusion model's t and noise drawn in the forward, random "
            "projections drawn in the loss), so the Gram's per-example passes draw anew (the "
            "sharpness, trace and density use one seeded draw per probe chunk) and the "
            "example-alone gradients do not add up to the probe's. Put the draws in the probe "
            "(probe=((x, t, eps), eps) with a forward that takes them) or gate the randomness "
            "on self.training (F.dropout(x, p, self.training))"
        )
    return (
        "the per-example losses are coupled across examples (BatchNorm without running "
        "statistics, a layer or loss that mixes the batch): the gradients are each example's "
        f"own, alone, which add up to a norm of {apart:.4g}, not to the summed probe losses' "
        f"{batch:.4g}"
    )


@dataclass(frozen=True)
class _Randomness:
    """Why two passes of one probe example differ.

    Attributes:
        buffers: The buffers the first pass changed (a statistic updated in eval mode); empty
            for a random forward or loss.
        unpinned: The draws are not fixed by seeding torch (numpy, Python's ``random``, the
            script's own generator), so two passes pinned alike differ too.
    """

    buffers: tuple[str, ...] = ()
    unpinned: bool = False


def _random(
    model: nn.Module,
    params: list[nn.Parameter],
    inputs: Batch,
    targets: Batch,
    forward: ForwardFn,
    loss_fn: LossFn,
) -> _Randomness | None:
    """Whether two passes (forward and loss) of the first example give different outputs or
    losses: None where they do not (or a pass fails: that has another cause), else why
    (:class:`_Randomness`). The buffers are put back.

    The passes run with gradients on (without a graph kept), for losses that differentiate
    with respect to the inputs (sliced score matching)."""
    x, y = take(inputs, slice(0, 1)), take(targets, slice(0, 1))
    buffers = dict(model.named_buffers())
    before = {n: b.detach().clone() for n, b in buffers.items()}

    def once() -> list[Tensor]:
        out = forward(model, x)
        loss = per_example_losses(loss_fn, out, y, 1)
        return [t.detach() for t in tree_flatten(out)[0] if isinstance(t, Tensor)] + [loss.detach()]

    try:
        first = once()
        changed = [
            n
            for n, b in buffers.items()
            if b.shape != before[n].shape or not torch.equal(b, before[n])
        ]
        second = once()
        differ = len(first) != len(second) or any(
            a.shape != b.shape or not torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
            for a, b in zip(first, second, strict=True)
        )
        if differ and not changed and unpinned(once, cuda_devices(params)):
            return _Randomness(unpinned=True)
    except Exception:
        return None
    finally:
        with torch.no_grad():
            for n, b in buffers.items():
                if b.shape == before[n].shape:
                    b.copy_(before[n])
    return _Randomness(buffers=tuple(changed)) if differ else None
