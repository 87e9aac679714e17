"""Ranks meet before the sharded measurement's collectives, with a time limit, never for ever.

A collective waits until every rank of the group has called it. With ``Agent(distributed=True)``
that needs an agent on every rank, each calling ``step()`` at every training step; a script that
makes the agent or calls ``step()`` on rank 0 only would otherwise leave a rank waiting in a
collective for the process group's own timeout (30 minutes for gloo), then abort with an error
that names nothing of stiffmon's.

* **At construction** (:func:`meet`): every rank's agent checks in through the process group's
  key-value store and waits at most ``timeout`` seconds for the others. Rank 0 decides: ``go``
  once every rank has checked in, ``abort`` when the time is up; a rank that gives up first
  writes ``abort`` itself. The decision is one compare-and-set key, so every rank, however late,
  reads the same one, and nobody enters a collective the others never reach.
* **Before each measurement** (:class:`RankGate`): rank 0's decision (measure or not) travels in
  an all-reduce over a gloo group of the agent's own, created with ``timeout``. A rank that is
  not there in time makes the all-reduce raise on the ranks that are; they stop sharding and
  say why (:class:`RanksMissing`), and training goes on. So do they where the ranks' weights
  differ (:mod:`~stiffmon_agent.weight_agreement`): a sharded measurement would mix models.
"""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from stiffmon_agent.distributed import Shard
from stiffmon_agent.rank_batches import RankBatches
from stiffmon_agent.weight_agreement import differing_weights

_AGENTS = itertools.count()  # agents made with distributed=True in this process, in order


class RanksMissing(RuntimeError):
    """Some ranks did not reach the meeting in time."""


def _store() -> Any:
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def meet(rank: int, world: int, timeout: float) -> None:
    """Wait (at most ``timeout`` seconds) until every rank has made its agent.

    Agents are matched by the order in which each process makes them (its n-th
    ``Agent(distributed=True)`` meets the other ranks' n-th).

    Raises:
        RanksMissing: On every rank, if some rank did not make its agent in time.
    """
    store = _store()
    prefix = f"stiffmon/agent{next(_AGENTS)}"
    keys = [f"{prefix}/rank{r}" for r in range(world)]
    decision = f"{prefix}/decision"
    store.set(keys[rank], "1")
    waited = timedelta(seconds=timeout)
    try:  # rank 0 waits for everyone, the others for rank 0's word
        store.wait(keys if rank == 0 else [decision], waited)
        outcome = store.compare_set(decision, "", "go") if rank == 0 else store.get(decision)
    except RuntimeError:  # the store's timeout (DistStoreError is a RuntimeError)
        outcome = store.compare_set(decision, "", "abort")
    if outcome == b"go":
        return
    missing = [r for r, key in enumerate(keys) if not store.check([key])]
    raise RanksMissing(
        f"Agent(distributed=True): no agent from rank(s) {', '.join(map(str, missing))} within "
        f"{timeout:g} s (rank_timeout). Sharded measurement needs the agent made on every rank, "
        "with the same arguments, and step() called on every rank; or pass distributed=False "
        "(rank 0 then measures alone)"
    )


class RankGate:
    """Rank 0's measure-or-not decision, delivered to every rank of ``shard`` within a time limit.

    Made with :meth:`meeting` (after every rank's agent has checked in): a gate exists only for
    a rank that takes part in the sharded measurement, and carries that rank's place.

    Args:
        shard: This rank's place in the sharded measurement.
        timeout: Seconds a rank waits for the others at each measurement.
    """

    def __init__(self, shard: Shard, timeout: float) -> None:
        self.shard = shard
        self.timeout = timeout
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        self.batches: RankBatches | None = None  # every rank's last batch rides along
        self.model: nn.Module | None = None  # the measured module: the same weights on every rank

    @classmethod
    def meeting(cls, shard: Shard, timeout: float) -> RankGate:
        """:func:`meet` the other ranks' agents, then the gate (a collective every rank makes).

        Raises:
            RanksMissing: If some rank's agent did not check in within ``timeout``.
        """
        meet(shard.rank, shard.world, timeout)
        return cls(shard, timeout)

    def decide(self, go: bool, step: int) -> bool:
        """Rank 0's ``go`` on every rank (the others' ``go`` is ignored); with :attr:`batches`,
        every rank's last training batch comes along (B and ``sum_over`` from all of them).

        Raises:
            RanksMissing: If a rank did not reach this measurement within the timeout.
        """
        counts = self.batches.slots() if self.batches is not None else []
        flag = torch.tensor(
            [int(go) if self.shard.leader else 0, step, -step, *counts], dtype=torch.int64
        )
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        except RuntimeError as exc:
            first = (str(exc).splitlines() or [""])[0][:200]
            raise RanksMissing(
                f"a rank did not reach the measurement of step {step} within {self.timeout:g} s "
                "(rank_timeout): step() must be called on every rank at every training step "
                "(uneven inputs: pass the agent to Join after the model, Join([model, agent])) "
                f"({type(exc).__name__}: {first})"
            ) from exc
        if int(flag[1]) != -int(flag[2]):
            raise RanksMissing(
                f"the ranks are at different steps ({-int(flag[2])} to {int(flag[1])}) at a "
                "measurement: step() must be called on every rank at every training step"
            )
        if self.batches is not None:
            self.batches.agree(flag[3:].tolist())
            if flag[0] and self.model is not None:  # a joined rank measures the others' weights
                try:
                    self.batches.sync_joined(self.model, step)
                except RuntimeError as exc:  # sharding stops; the training goes on
                    why = f"the weights for a joined rank did not arrive: {exc}"
                    raise RanksMissing(why) from exc
        if flag[0] and self.model is not None:  # the same weights on every rank, or no sharding
            try:
                why = differing_weights(self.model, self.group, step)
            except RuntimeError as exc:
                why = f"the ranks' weight checksums did not meet: {exc}"
            if why is not None:
                raise RanksMissing(why)
        return bool(flag[0])
