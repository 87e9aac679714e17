"""A loop that replaces its optimizer object mid-run (Adam for warm-up, then SGD) steps one the
agent does not see: the warning says what may have happened and how to go on (a new agent with
the new optimizer and ``start_step``), which then continues the run's steps with the new lr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from stiffmon import protocol as p
from stiffmon.session import read_session
from tests.agent.recording import events, offline_agent, train_step


def test_a_replaced_optimizer_is_named_and_a_new_agent_continues(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.arange(32) % 3
    model = nn.Linear(4, 3)
    opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rec = tmp_path / "swap.stiff"
    agent = offline_agent(model, nn.CrossEntropyLoss(), opt, rec)
    for s in range(14):
        if s == 10:
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
        train_step(agent, opt, nn.functional.cross_entropy(model(x), y))
    agent.close()
    skipped = events(read_session(rec)[0], "optimizer-step-skipped")
    assert skipped and skipped[0].step == 10
    assert "new optimizer object" in skipped[0].message
    assert "start_step=10" in skipped[0].message
    again = offline_agent(model, nn.CrossEntropyLoss(), opt, rec, start_step=14)
    for _ in range(3):
        train_step(again, opt, nn.functional.cross_entropy(model(x), y))
    again.close()
    runs = read_session(rec)
    cols = [m for m in runs[0] if isinstance(m, p.Columns) and m.run == again.run_id]
    steps = np.concatenate([m.steps for m in cols]).tolist()
    lrs = np.concatenate([m.column("lr/0") for m in cols]).tolist()
    assert steps == [14, 15, 16] and lrs == [0.05] * 3
