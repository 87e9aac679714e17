"""A plain ``Agent`` resumed from a checkpoint continues the step count (``start_step``).

Before ``start_step`` a script restarted at step 5000 with the same ``record=`` file recorded
its steps and measurements as 0, 1, … again: the resumed run's data sat on top of the first
run's, mislabelled.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from stiffmon.session.reader import read_session
from stiffmon_agent import Agent
from tests.agent.recording import offline_agent, train_step


def _train(rec: Path, start: int, n: int) -> str:
    torch.manual_seed(0)
    x, y = torch.randn(48, 6), torch.randint(0, 4, (48,))
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    agent = offline_agent(
        net, nn.CrossEntropyLoss(), opt, rec, probe=(x[:16], y[:16]), gram_every=2,
        sharpness_every="never", density_every="never", overhead_cap=None, run="r",
        start_step=start,
    )  # fmt: skip
    for _ in range(n):
        out = net(x[16:])
        train_step(agent, opt, nn.functional.cross_entropy(out, y[16:]), out, y[16:])
    agent.close()
    return agent.run_id


def test_resumed_run_continues_the_step_count(tmp_path: Path) -> None:
    rec = tmp_path / "resume.stiff"
    first = _train(rec, 0, 5)
    second = _train(rec, 5000, 5)
    steps: dict[str, list[int]] = {first: [], second: []}
    grams: dict[str, list[int]] = {first: [], second: []}
    for m in read_session(rec)[0]:
        kind = type(m).__name__
        if kind == "Columns":
            steps[m.run] += [int(s) for s in m.steps]
        elif kind == "Scalars" and "noise/trace_k" in m.names:
            grams[m.run].append(m.step)
    assert steps == {first: [0, 1, 2, 3, 4], second: [5000, 5001, 5002, 5003, 5004]}
    assert grams == {first: [0, 2, 4], second: [5000, 5002, 5004]}


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_start_step_must_be_a_count(bad: object) -> None:
    with pytest.raises(ValueError, match="start_step"):
        Agent(nn.Linear(2, 2), nn.MSELoss(), endpoint="", registry=False, start_step=bad)  # type: ignore[arg-type]
