"""While the training loop is in a measurement, the agent's heartbeats say which: the monitor
shows the run measuring, not hung (:mod:`stiffmon.run_health`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from stiffmon import protocol as p
from stiffmon_agent.outgoing import Outgoing
from stiffmon_agent.runner import MeasurementRunner
from tests.agent.recording import EVERY_STEP, close_and_read, offline_agent, train_step


def test_heartbeats_name_the_measurement_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = offline_agent(model, loss_fn, opt, tmp_path / "r.stiff", probe=(x, y), **EVERY_STEP)
    pub = agent.publisher
    assert pub is not None
    beats: list[tuple[str, str]] = []  # (the measurement running, its heartbeat's words)
    measure = MeasurementRunner.measure

    def spied(runner: MeasurementRunner, kind: str, step: int) -> bool:
        sent: list[Outgoing] = []
        emit = pub._emit
        monkeypatch.setattr(pub, "_emit", lambda item, *a: sent.append(item))
        pub._heartbeat(None, None, record=False)  # what the thread sends meanwhile
        monkeypatch.setattr(pub, "_emit", emit)
        beats.append((kind, sent[0].fields["measuring"]))
        return measure(runner, kind, step)

    monkeypatch.setattr(MeasurementRunner, "measure", spied)
    train_step(agent, opt, loss_fn(model(x), y))
    assert beats == [("gram", "gram"), ("sharpness", "sharpness")]
    assert pub.measuring == ""  # between measurements
    msgs: list[Any] = close_and_read(agent, tmp_path / "r.stiff")
    hb = [m for m in msgs if isinstance(m, p.Heartbeat)]
    assert hb and all(m.measuring == "" for m in hb)  # recorded at the end: none running
