"""Stability thresholds of ``torch.distributed.optim.ZeroRedundancyOptimizer``: its global param
groups carry the inner optimizer's hyper-parameters, so SGD inside it has SGD's bound (it had
none: "no stability rule known for ZeroRedundancyOptimizer"); an adaptive inner optimizer's state
is sharded over the ranks, so no P can be read on one rank and the reason says so.

A one-process gloo group is enough: the thresholds are read from the groups, not the shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from stiffmon_agent.metrics import stability_threshold_for
from tests.agent.recording import close_and_read, events, last_scalar, offline_agent, train_step


@pytest.fixture
def one_rank(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("one_rank")
def test_sgd_inside_zero_has_sgds_bound_at_every_group() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    zero = ZeroRedundancyOptimizer(
        net[0].parameters(), optimizer_class=torch.optim.SGD, lr=0.1, momentum=0.9
    )
    zero.add_param_group({"params": list(net[1].parameters()), "lr": 0.4, "momentum": 0.0})
    t = stability_threshold_for(zero)
    assert t.value == pytest.approx(min(2 * 1.9 / 0.1, 2 / 0.4)) and t.group == 1, t.rule
    assert "(SGD, group 1)" in t.rule
    adam = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3)
    t = stability_threshold_for(adam)
    assert t.value is None and "sharded over the ranks" in t.rule


@pytest.mark.usefixtures("one_rank")
def test_the_agent_publishes_the_bound_of_sgd_inside_zero(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.arange(16) % 2
    zero = ZeroRedundancyOptimizer(
        net.parameters(), optimizer_class=torch.optim.SGD, lr=0.05, momentum=0.9
    )
    rec = tmp_path / "zero.stiff"
    agent = offline_agent(
        net, nn.CrossEntropyLoss(), zero, rec, probe=(x[:8], y[:8]), gram_every="never",
        sharpness_every=1, density_every="never", overhead_cap=None,
    )  # fmt: skip
    train_step(agent, zero, nn.functional.cross_entropy(net(x[8:]), y[8:]))
    msgs = close_and_read(agent, rec)
    assert last_scalar(msgs, "sharpness/threshold") == pytest.approx(2 * 1.9 / 0.05)
    assert not events(msgs, "threshold-none")
