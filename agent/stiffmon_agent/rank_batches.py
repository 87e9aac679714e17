r"""The training batch B and a sum-reduced loss's ``sum_over`` under DDP, from every rank's batch.

``DistributedDataParallel`` averages the ranks' gradients: with rank r's loss L_r over its b_r
examples, a step descends F with ∇F = (1/W) Σ_r ∇L_r. So

* **sum-reduced loss** (L_r = Σ_{i∈r} ℓ_i): F = (1/W) Σ_r Σ_{i∈r} ℓ_i = (B/W) × the mean of ℓ
  over the B = Σ_r b_r examples of the step: ``sum_over`` = B / W (not one rank's b_r; a
  fraction where W does not divide B), and λ1_H is that of (B/W) × the per-example mean;
* **mean-reduced loss** (L_r = (1/b_r) Σ_{i∈r} ℓ_i): F = Σ_r Σ_{i∈r} ℓ_i / (W b_r), a weighted
  mean whose weights add up to 1: λ1_H is that of the per-example mean (what F is in expectation
  over which examples land on which rank), B = Σ_r b_r is the step's examples (η/B with it).
  With uneven b_r the weights differ, and the gradient noise is that of a batch of
  W² / Σ_r (1/b_r) ≤ B (W × the harmonic mean of the b_r): equal when the b_r are.

Each rank sees only its own batch (the logits passed to ``step()``), and no collective may run at
every training step. :class:`RankBatches` keeps this rank's last batch; with
``Agent(distributed=True)`` the counts travel in the all-reduce that already carries rank 0's
measure-or-not decision before each measurement (:meth:`~stiffmon_agent.rank_gate.RankGate.decide`:
one slot per rank, a MAX reduce), and B and ``sum_over`` are set from all of them. Between
measurements (and without ``distributed=True``) rank 0's own batch stands for every rank's:
B = W b_0, ``sum_over`` = b_0 (exact when the batches are even). A rank that has joined under
``Join([model, agent])`` counts b_r = 0 (:mod:`~stiffmon_agent.agent_join`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from stiffmon_agent.sharpness_state import SharpnessState

if TYPE_CHECKING:
    from stiffmon_agent.rank_gate import RankGate


class RankBatches:
    """This rank's last training batch, and B / ``sum_over`` from every rank's at a measurement.

    Args:
        state: Where B (``batch_size``) and ``sum_over`` go; a ``sum_over`` it holds already
            (given, or B / W from ``batch_size=``) is kept, and so is a ``batch_size`` (given:
            the logits are not read for it).
        replicas: W for a DDP-wrapped model (gradients averaged over W ranks), else 1.
        gate: Where the ranks meet before each measurement (sharded measurement; None: one
            process measures): the counts travel in its all-reduce (it gets ``batches``).
    """

    def __init__(
        self,
        state: SharpnessState,
        replicas: int,
        gate: RankGate | None = None,
    ) -> None:
        self.state = state
        self.replicas = replicas
        self.sum_over_given = state.sum_over is not None
        self.batch_size_given = state.batch_size is not None
        shard = gate.shard if gate is not None else None
        self.rank, self.world = (shard.rank, shard.world) if shard is not None else (0, 1)
        if gate is not None:
            gate.batches = self
        self.local: int | None = None  # this rank's last batch (None: none seen; 0: joined)
        self.divide_by_initial = True  # Join's divide_by_initial_world_size
        self.source: int | None = None  # the rank whose weights a joined rank takes
        self._synced = -1  # the step whose weights went to the joined ranks

    def seen(self, logits: Tensor | None) -> int | None:
        """Note a step's logits (first dimension: this rank's batch b); return B as rank 0 sees
        it, W × b (None without logits, or with ``batch_size=`` given). Sets B and
        ``sum_over`` (b under DDP) until the next agreement."""
        if not isinstance(logits, Tensor) or logits.ndim < 1:
            return None
        self.local = b = int(logits.shape[0])
        if self.batch_size_given:
            return None
        self.state.batch_size = b * self.replicas
        if self.replicas > 1 and not self.sum_over_given:  # a sum loss adds up B / W
            self.state.sum_over = b
        return b * self.replicas

    def slots(self) -> list[int]:
        """W counts, 1 + this rank's last batch in its own slot (0: unknown) and 0 elsewhere (a
        MAX all-reduce of every rank's gives every rank's batch)."""
        out = [0] * self.world
        out[self.rank] = 0 if self.local is None else self.local + 1
        return out

    def agree(self, slots: Sequence[int]) -> None:
        """Set B = Σ_r b_r and ``sum_over`` = B / W from every rank's :meth:`slots`.

        W is the ranks still training where a rank has joined and Join divides by them
        (``divide_by_initial_world_size=False``). B stays with ``batch_size=`` given, for a
        model not wrapped in DDP (its averaging over the ranks is unknown: ``batch_size=`` says
        B), or where a rank has seen no logits yet (then rank 0's batch stands for every rank's).
        """
        counts = [c - 1 for c in slots]
        joined = 0 in counts and len(counts) == self.world and max(counts) > 0
        self.source = next(r for r, c in enumerate(counts) if c > 0) if joined else None
        unknown = len(counts) != self.replicas or min(counts, default=-1) < 0
        active = sum(c > 0 for c in counts)
        shrunk = joined and self.divide_by_initial and not unknown and self.replicas > 1
        self.state.active = (active, self.replicas) if shrunk else None
        if self.batch_size_given or self.replicas <= 1 or unknown:
            return
        total = sum(counts)
        self.state.batch_size = total
        if not self.sum_over_given:
            w = self.replicas if self.divide_by_initial else active
            self.state.sum_over = total // w if total % w == 0 else total / w

    def sync_joined(self, model: nn.Module, step: int) -> None:
        """Where a rank has joined (its optimizer stands still), every parameter and buffer of
        ``model`` from :attr:`source` to every rank, once per step (a collective: every rank
        calls it)."""
        if self.source is None or self._synced == step:
            return
        self._synced = step
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, self.source)
