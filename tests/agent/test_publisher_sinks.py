"""A message sink (an integration such as W&B) sees every published message but heartbeats, as
recorded; one that raises is said on the console once, removed, and never stops the publishing
or recording."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from stiffmon import protocol as p
from tests.agent.recording import close_and_read, offline_agent


def test_sinks_see_what_is_recorded_and_a_failing_one_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = nn.Linear(2, 2)
    agent = offline_agent(model, nn.CrossEntropyLoss(), None, tmp_path / "r.stiff")
    seen: list[p.Message] = []

    def broken(msg: p.Message) -> None:
        raise RuntimeError("sink down")

    assert agent.publisher is not None
    agent.publisher.sinks += [broken, seen.append]
    for k in range(300):
        agent.step(torch.tensor(float(k)))
    msgs = close_and_read(agent, tmp_path / "r.stiff")
    steps = [int(s) for m in msgs if isinstance(m, p.Columns) for s in m.steps]
    assert steps == list(range(300))  # every step recorded
    assert [m.seq for m in seen] == [m.seq for m in msgs if m.KIND != "heartbeat"][: len(seen)]
    assert any(isinstance(m, p.Columns) for m in seen)
    said = "a message sink failed and is removed: RuntimeError('sink down')"
    assert caplog.text.count(said) == 1 and agent.publisher.sinks == [seen.append]
