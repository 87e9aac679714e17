r"""The agent under ``torch.distributed.algorithms.join.Join`` (uneven inputs per rank).

With ``Join([model, agent])`` (the DDP model first), a rank that has run out of batches shadows
the others' collectives until every rank has: DDP's join hook matches the gradient all-reduce of
each step the others still take, and the agent's (:class:`_AgentJoinHook`) takes part in each
such step's measurements, so the others never wait for it (without it they would wait
``rank_timeout`` at the first measurement, then stop sharding for the rest of the run).

A joined rank adds no examples: B = Σ_r b_r over the ranks still training, and DDP divides their
summed gradients by W (``divide_by_initial_world_size=True``, Join's default) or by the ranks
still training (False), so a sum-reduced loss's ``sum_over`` is B / W or B / W_active
(:class:`~stiffmon_agent.rank_batches.RankBatches`). A mean-reduced loss's objective is then
(W_active / W) × a weighted per-example mean, and λ1_H is that of W_active / W × the mean
(with ``divide_by_initial_world_size=False``, of the mean).
A joined rank takes no optimizer step, so its weights are stale: before a measurement while a
rank has joined, every parameter and buffer is broadcast from the lowest rank still training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.distributed import distributed_c10d
from torch.distributed.algorithms.join import Joinable, JoinHook, _JoinConfig

from stiffmon_agent.distributed import collective_device

if TYPE_CHECKING:
    from stiffmon_agent.agent import Agent


class _AgentJoinHook(JoinHook):
    """One step of the others' per joined iteration: the agent's share of its measurements."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def main_hook(self) -> None:
        agent = self.agent
        if agent.closed or agent.shard is None:
            return
        agent._batches.local = 0  # this rank trains on no examples
        if agent.step_count >= agent._next_due:
            agent._measure_due(agent.step_count)
        agent.step_count += 1


class JoinableAgent(Joinable):
    """Lets ``Join([model, agent])`` keep a joined rank in the sharded measurements."""

    # Agent.__init__ does not call Joinable's: the disabled configuration until a Join sets it
    _join_config = _JoinConfig.construct_disabled_join_config()  # type: ignore[no-untyped-call]

    def join_hook(self: Any, **kwargs: Any) -> JoinHook:
        """The hook a ``Join`` runs on a joined rank; ``divide_by_initial_world_size`` (Join's
        keyword, default True) says what DDP divides the summed gradients by."""
        self._batches.divide_by_initial = bool(kwargs.get("divide_by_initial_world_size", True))
        return _AgentJoinHook(self)

    @property
    def join_device(self: Any) -> torch.device:
        return collective_device(self.model) or torch.device("cpu")

    @property
    def join_process_group(self: Any) -> Any:
        """The default process group (the one the sharded measurement uses).

        Raises:
            ValueError: If the agent is the first joinable of the ``Join``: the first one's
                all-reduce must come before the step's gradient all-reduce (DDP's forward pass),
                the agent's ``step()`` comes after it.
        """
        if self._join_config.enable and self._join_config.is_first_joinable:
            raise ValueError(
                "Join([model, agent]): the DDP model must come before the agent (the first "
                "joinable's all-reduce is in DDP's forward pass)"
            )
        return distributed_c10d._get_default_group()
