"""A notebook cell that builds an agent again while the first one is still open and recording to
the same file: both runs go into it (apart by run id), and the new one says so."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from stiffmon.session import read_session
from tests.agent.recording import events, offline_agent


def test_a_second_agent_on_the_same_file_warns_and_both_runs_are_kept(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = tmp_path / "nb.stiff"
    first = offline_agent(model, nn.CrossEntropyLoss(), opt, rec)
    second = offline_agent(model, nn.CrossEntropyLoss(), opt, tmp_path / "." / "nb.stiff")
    third = offline_agent(model, nn.CrossEntropyLoss(), opt, tmp_path / "other.stiff")
    for agent in (first, second, third):
        agent.step(1.0)
    for agent in (second, first, third):
        agent.close()
    runs = {m.run: m for m in read_session(rec)[0] if m.KIND == "hello"}
    assert set(runs) == {first.run_id, second.run_id}
    msgs = read_session(rec)[0]
    (said,) = events([m for m in msgs if m.run == second.run_id], "record-shared")
    assert first.run_id in said.message and "nb.stiff" in said.message and said.level == "warning"
    assert not events([m for m in msgs if m.run == first.run_id], "record-shared")
    assert not events(read_session(tmp_path / "other.stiff")[0], "record-shared")
