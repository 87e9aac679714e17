r"""Who computes which part of the sharded Gram matrix, and the point-to-point traffic for it.

The examples are split in W contiguous shards I_0 … I_{W-1}; G_l's block (i, j) needs the
per-example gradients of shards i and j. An all-gather sends every rank's gradients to every
other rank and each rank computes its whole row of blocks: every off-diagonal block is computed
twice (as (i, j) and as (j, i) = (i, j)ᵀ). Here each pair {i, j} is split between its two ranks.
With a = :func:`owner` (i, j) and b the other, and I_a = I_a' ∪ I_a'' its first and second half:

* a computes G[I_a', I_b] and so receives all of b's rows;
* b computes G[I_b, I_a''] (= G[I_a'', I_b]ᵀ) and so receives a's second half.

Every rank computes its diagonal block and one half block per other rank: the products are
shared evenly and each is computed once. Per pair 1.5 shards of rows cross (an all-gather: 2),
and alternating the owner by parity spreads what each rank receives. The diagonal block is
computed while the rows travel. Each rank sends its blocks to rank 0, which alone assembles
G (only rank 0 publishes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


def owner(i: int, j: int) -> int:
    """The rank of the pair {i, j}, i ≠ j, that receives all of the other's rows: the lower
    one when i + j is odd, else the higher."""
    lo, hi = min(i, j), max(i, j)
    return lo if (lo + hi) % 2 else hi


@dataclass(frozen=True)
class Task:
    """A block one rank computes: its own rows [lo, hi) × rows [other_lo, other_hi) of shard
    ``other`` (``other`` is the rank itself for the diagonal block). Rows count within a shard.
    """

    lo: int
    hi: int
    other: int
    other_lo: int
    other_hi: int

    @property
    def size(self) -> int:
        """Elements of the block."""
        return (self.hi - self.lo) * (self.other_hi - self.other_lo)


def tasks(rank: int, counts: Sequence[int]) -> list[Task]:
    """The blocks ``rank`` computes, given the examples per shard: its diagonal block first,
    then one per other rank, increasing (the same list on every rank)."""
    n = counts[rank]
    out = [Task(0, n, rank, 0, n)]
    for j in range(len(counts)):
        if j == rank:
            continue
        if owner(rank, j) == rank:  # my first half × all of theirs
            out.append(Task(0, n // 2, j, 0, counts[j]))
        else:  # all of mine × the owner's second half
            out.append(Task(0, n, j, counts[j] // 2, counts[j]))
    return out


def needed(by: int, of: int, counts: Sequence[int]) -> tuple[int, int]:
    """The rows [lo, hi) of shard ``of`` that rank ``by`` needs (``by`` ≠ ``of``)."""
    t = tasks(by, counts)[1:][of if of < by else of - 1]
    return t.other_lo, t.other_hi


class Pending:
    """Rows on their way (:func:`post_exchange`): :meth:`wait` returns them."""

    def __init__(
        self, got: dict[int, list[Tensor]], works: list[dist.Work | None], sent: list[Tensor]
    ) -> None:
        self._got, self._works, self._sent = got, works, sent

    def wait(self) -> dict[int, list[Tensor]]:
        """Each other rank's rows this rank needs, once its sends and receives are done."""
        for w in self._works:
            if w is not None:  # None only off the group, which every rank here is in
                w.wait()
        self._works, self._sent = [], []
        return self._got


def receive_buffers(
    flat: Sequence[Tensor], counts: Sequence[int], rank: int
) -> dict[int, list[Tensor]]:
    """Empty buffers for the rows ``rank`` needs of each other rank: per rank, one like each of
    ``flat``'s tensors (n_rank, …).

    Allocated before the exchange is posted, so that a rank that cannot allocate fails before
    any other rank waits for it."""
    out = {}
    for j in range(len(counts)):
        if j != rank:
            lo, hi = needed(rank, j, counts)
            out[j] = [t.new_empty((hi - lo, *t.shape[1:])) for t in flat]
    return out


def post_exchange(
    flat: Sequence[Tensor], got: dict[int, list[Tensor]], counts: Sequence[int], rank: int
) -> Pending:
    """Start sending this rank's rows of the tensors ``flat`` (each (n_rank, …)) where other
    ranks need them, and receiving the rows it needs of theirs into ``got``
    (:func:`receive_buffers`); the caller computes meanwhile and then waits.

    Each tensor travels alone (a row range of a contiguous tensor is sent in place, nothing is
    copied into one buffer first), tagged with its index. Every send and receive is posted in
    one batch (``batch_isend_irecv``) before any is waited for, so the order between ranks does
    not matter; empty ranges are not sent."""
    ops: list[dist.P2POp] = []
    sent: list[Tensor] = []
    for j in range(len(counts)):
        if j == rank:
            continue
        for tag, buf in enumerate(got[j]):
            if buf.numel():
                ops.append(dist.P2POp(dist.irecv, buf, j, tag=tag))
        lo, hi = needed(j, rank, counts)
        for tag, t in enumerate(flat):
            if (hi - lo) * math.prod(t.shape[1:]):  # the receiver's buffer is not empty
                sent.append(t[lo:hi].contiguous())
                ops.append(dist.P2POp(dist.isend, sent[-1], j, tag=tag))
    # One batch: NCCL runs single point-to-point calls in order on one stream, where two ranks
    # each receiving before sending to the other would wait for each other for ever.
    works: list[dist.Work | None] = list(dist.batch_isend_irecv(ops)) if ops else []
    return Pending(got, works, sent)


def block_buffers(mine: Tensor, counts: Sequence[int], rank: int) -> dict[int, Tensor]:
    """On rank 0, empty buffers for every other rank's blocks (like ``mine``, (K, Σ sizes));
    empty elsewhere. Allocated before any rank sends, like :func:`receive_buffers`."""
    if rank:
        return {}
    k = mine.shape[0]
    return {
        r: mine.new_empty((k, sum(t.size for t in tasks(r, counts)))) for r in range(1, len(counts))
    }


def collect(
    mine: Tensor, parts: dict[int, Tensor], counts: Sequence[int], rank: int
) -> Tensor | None:
    """Assemble G's layers on rank 0 from every rank's blocks; None on the other ranks.

    Args:
        mine: (K, Σ sizes): this rank's K layer blocks, flattened in the order of
            :func:`tasks`.
        parts: On rank 0, :func:`block_buffers`.
        counts: Examples per shard.

    Returns:
        On rank 0, (K, N, N) with each block and the transpose of each off-diagonal one in
        place.
    """
    world = len(counts)
    k = mine.shape[0]
    if rank:
        dist.send(mine.contiguous(), dst=0)
        return None
    works = [dist.irecv(parts[r], src=r) for r in range(1, world)]
    for w in works:
        if w is not None:
            w.wait()
    parts = {0: mine, **parts}
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    out = mine.new_zeros((k, starts[-1], starts[-1]))
    for r in range(world):
        at = 0
        for t in tasks(r, counts):
            block = parts[r][:, at : at + t.size].reshape(k, t.hi - t.lo, t.other_hi - t.other_lo)
            at += t.size
            rows = slice(starts[r] + t.lo, starts[r] + t.hi)
            cols = slice(starts[t.other] + t.other_lo, starts[t.other] + t.other_hi)
            out[:, rows, cols] = block
            if t.other != r:
                out[:, cols, rows] = block.transpose(1, 2)
    return out


def flatten_blocks(blocks: list[list[Tensor]]) -> Tensor:
    """(K, …) from ``blocks[layer][b]``, each (rows, cols) in the order of :func:`tasks`."""
    return torch.stack([torch.cat([b.reshape(-1) for b in layer]) for layer in blocks])
