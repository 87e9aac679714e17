"""One side of the sharded-measurement benchmark (run by ``tests.benchmarks.agent`` [6]).

    torchrun --nproc_per_node W -m tests.benchmarks.sharded_worker REPEATS PER_CLASS CHANNELS KIND

W = 1 is the one-process agent (the baseline: ``distributed=True`` with one process changes
nothing); W = 2 shards the probe. Only ``KIND`` (gram, sharpness or density) is measured, at
every step: with several kinds due at one step, what one rank still had to do of one
measurement was counted in rank 0's time of the next. Rank 0 prints one JSON line: the median
seconds of the measurement (rank 0's wall time of the whole measurement, collectives included).
"""

from __future__ import annotations

import json
import statistics
import sys

import torch
import torch.distributed as dist
from torch import nn

from stiffmon_agent import Agent
from stiffmon_agent.demo.data import load_digits_split
from stiffmon_agent.demo.models import digits_cnn


def main() -> None:
    repeats, per_class, channels = (int(a) for a in sys.argv[1:4])
    kind = sys.argv[4]
    every = {k: 1 if k == kind else "never" for k in ("gram", "sharpness", "density")}
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    data = load_digits_split(seed=0, per_class=per_class)
    model = nn.parallel.DistributedDataParallel(digits_cnn(channels))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    agent = Agent(
        model,
        nn.CrossEntropyLoss(),
        opt,
        probe=data.probe_train,
        val_probe=data.probe_val,
        endpoint="",
        registry=False,
        distributed=True,
        gram_every=every["gram"],
        sharpness_every=every["sharpness"],
        density_every=every["density"],
        overhead_cap=None,
        batch_size=64,
    )
    costs: list[float] = []
    x, y = data.x_train[:64], data.y_train[:64]
    for s in range(repeats + 1):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        agent.step(loss)
        if s:  # the first measurement warms up
            costs.append(agent._budget.last_cost[kind])
    agent.close()
    if dist.get_rank() == 0:
        med = {kind: statistics.median(costs)}
        print(json.dumps({"world": dist.get_world_size(), "n": agent.probe.n, **med}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
