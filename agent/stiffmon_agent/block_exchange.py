r"""Who computes which block of the sharded Gram matrix, and the point-to-point traffic for it.

The examples are split in W contiguous shards; G_l's block (i, j) needs the per-example
gradients of shards i and j. An all-gather sends every rank's gradients to every other rank,
both ways, and each rank then computes its whole row of blocks: every off-diagonal block is
computed twice (once as (i, j), once as (j, i) = (i, j)ᵀ) and every byte crosses twice. Here
each pair {i, j} belongs to one rank (:func:`owner`), the other sends it its gradients, one
way; each rank computes its diagonal block and the blocks it owns, and sends them to rank 0,
which alone assembles G (only rank 0 publishes). Half the gradient bytes, half the products,
and no other rank receives G.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def owner(i: int, j: int) -> int:
    """The rank that computes the blocks (i, j) and (j, i), i ≠ j: the lower one when i + j is
    odd, else the higher, so each rank owns about half of its W - 1 pairs."""
    lo, hi = min(i, j), max(i, j)
    return lo if (lo + hi) % 2 else hi


def partners(rank: int, world: int) -> list[int]:
    """The ranks whose gradients ``rank`` needs: those of the pairs it owns, increasing."""
    return [j for j in range(world) if j != rank and owner(rank, j) == rank]


def audience(rank: int, world: int) -> list[int]:
    """The ranks that need ``rank``'s gradients (they own a pair with it), increasing."""
    return [j for j in range(world) if j != rank and owner(rank, j) == j]


def owned(rank: int, world: int) -> list[int]:
    """The column shards of the blocks ``rank`` computes: its own, then its partners'."""
    return [rank, *partners(rank, world)]


def exchange(flat: Tensor, counts: Sequence[int], rank: int, world: int) -> dict[int, Tensor]:
    """Send this rank's rows ``flat`` (n_rank, width) to its :func:`audience`; receive each
    partner's rows (counts[j], width). Every send and receive is posted before any is waited
    for, so the order between ranks does not matter."""
    flat = flat.contiguous()
    got = {j: flat.new_empty((counts[j], *flat.shape[1:])) for j in partners(rank, world)}
    works = [dist.irecv(buf, src=j) for j, buf in got.items()]
    works += [dist.isend(flat, dst=j) for j in audience(rank, world)]
    for w in works:
        if w is not None:  # None only off the group, which every rank here is in
            w.wait()
    return got


def collect(mine: Tensor, counts: Sequence[int], rank: int, world: int) -> Tensor | None:
    """Assemble G's layers on rank 0 from every rank's blocks; None on the other ranks.

    Args:
        mine: (K, Σ_{j in owned(rank)} n_rank n_j): this rank's K layer blocks, flattened in
            the order of :func:`owned`.
        counts: Examples per shard.

    Returns:
        On rank 0, (K, N, N) with block (i, j) and its transpose (j, i) in place.
    """
    k = mine.shape[0]
    size = [sum(counts[r] * counts[j] for j in owned(r, world)) for r in range(world)]
    if rank:
        dist.send(mine.contiguous(), dst=0)
        return None
    parts = {0: mine}
    for r in range(1, world):
        parts[r] = mine.new_empty((k, size[r]))
    works = [dist.irecv(parts[r], src=r) for r in range(1, world)]
    for w in works:
        if w is not None:
            w.wait()
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    n = starts[-1]
    out = mine.new_zeros((k, n, n))
    for r in range(world):
        at = 0
        for j in owned(r, world):
            m = counts[r] * counts[j]
            block = parts[r][:, at : at + m].reshape(k, counts[r], counts[j])
            at += m
            rows, cols = slice(starts[r], starts[r + 1]), slice(starts[j], starts[j + 1])
            out[:, rows, cols] = block
            if j != r:
                out[:, cols, rows] = block.transpose(1, 2)
    return out


def flatten_blocks(blocks: list[list[Tensor]]) -> Tensor:
    """(K, …) from ``blocks[layer][b]``, each (n_rank, n_j) in the order of :func:`owned`."""
    return torch.stack([torch.cat([b.reshape(-1) for b in layer]) for layer in blocks])
