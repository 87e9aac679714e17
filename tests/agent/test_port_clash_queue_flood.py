"""A loop that logs a value every step floods the agent's publish queue: the per-step losses
must still all be kept (they keep a reserve of the queue), and the run must say that it dropped
messages (a ``queue-full`` warning event), not lose them in silence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from stiffmon import protocol as p
from stiffmon.session import read_session
from stiffmon_agent import Agent


def test_a_log_flood_keeps_every_step_and_says_it_dropped(tmp_path: Path) -> None:
    rec = tmp_path / "flood.stiff"
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = Agent(
        model,
        nn.MSELoss(reduction="none"),
        opt,
        endpoint="",
        record=rec,
        registry=False,
        queue_size=200,
    )
    steps = 6000
    losses = 1.0 + np.sin(np.arange(steps) * 1e-3) + 1e-9 * np.arange(steps)
    for i in range(steps):
        agent.step(float(losses[i]))
        agent.log(v=float(losses[i]))  # one scalars message per step: far more than drained
    assert agent.dropped > 0  # the flood did overflow the queue
    agent.close()
    msgs = read_session(rec)[0]
    got: dict[int, float] = {}
    for m in msgs:
        if isinstance(m, p.Columns):
            for row in m.rows():
                if "loss" in row.names:
                    got[row.step] = float(row.values[row.names.index("loss")])
    assert sorted(got) == list(range(steps)), f"{steps - len(got)} of {steps} losses lost"
    worst = max(abs(got[s] - losses[s]) / abs(losses[s]) for s in range(steps))
    assert worst == 0.0
    said = [m for m in msgs if isinstance(m, p.Event) and m.code == "queue-full"]
    assert said and said[0].level == "warning", "dropped messages were not said"
    assert said[-1].attrs["dropped"] > 0
