r"""Do the ranks measure the same weights? A checksum before each sharded measurement.

The sharded measurement (:mod:`~stiffmon_agent.sharded`) adds up each rank's share of the probe
as if every rank held the same model. Under DDP they do, bit for bit (the same initial broadcast,
the same all-reduced gradients, the same optimizer), and with ``broadcast_buffers`` the same
BatchNorm statistics. A loop whose ranks drift apart (a bare module without gradient
synchronisation, local SGD between its averaging rounds, ``broadcast_buffers=False`` with
BatchNorm) gets a mixture of several models' Gram rows and Hessian-vector products: 17 % off on
a class-stiffness entry in one such run, silently.

:func:`checksum` reduces every parameter and floating buffer to one float64,
c = Σ_k (k + 1) Σ_j θ_kj (the position weight makes two swapped tensors count), computed the
same way on every rank: identical weights give identical bits. Before each measurement the ranks
all-reduce [c, −c] with MAX, so every rank learns max c and min c and takes the same decision:
where they differ beyond :data:`RELATIVE` of Σ_k (k + 1) Σ_j |θ_kj| the ranks hold different
weights and the measurement is not sharded (rank 0 measures alone, its own model, as without
``distributed=True``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

RELATIVE = 1e-12
"""Checksums this close (relative to the weights' absolute sum) are the same weights: DDP's are
bit-identical; the margin is for a reduction kernel that rounds differently on another device."""


def checksum(model: nn.Module) -> tuple[float, float]:
    """(c, its scale): the position-weighted sum of every parameter and floating buffer of
    ``model`` in float64, and the same sum of absolute values."""
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    per_device: dict[torch.device, list[torch.Tensor]] = {}
    with torch.no_grad():
        for k, t in enumerate(tensors):
            d = torch.view_as_real(t.detach()) if t.is_complex() else t.detach()
            sums = torch.stack([d.sum(dtype=torch.float64), d.abs().sum(dtype=torch.float64)])
            per_device.setdefault(d.device, []).append(sums * (k + 1))
        # one transfer per device (a GPU model: no synchronisation per tensor)
        parts = [torch.stack(v).sum(0).cpu() for v in per_device.values()]
    total = torch.stack(parts).sum(0) if parts else torch.zeros(2, dtype=torch.float64)
    return float(total[0]), float(total[1])


def differing_weights(model: nn.Module, group: object, step: int) -> str | None:
    """Why the ranks of ``group`` hold different weights at ``step`` (a collective: every rank
    calls it), or None where they agree."""
    c, scale = checksum(model)
    both = torch.tensor([c, -c, scale], dtype=torch.float64)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)  # type: ignore[arg-type]
    high, low, top = float(both[0]), -float(both[1]), float(both[2])
    if high == low or abs(high - low) <= RELATIVE * top:
        return None
    return (
        f"the ranks hold different weights at step {step} (parameter checksums {low:.17g} to "
        f"{high:.17g}): a sharded measurement would mix several models. Under DDP the ranks' "
        "weights are the same; a loop without gradient synchronisation, local SGD between its "
        "averaging rounds or DDP(broadcast_buffers=False) with BatchNorm lets them drift"
    )
