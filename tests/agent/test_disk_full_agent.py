"""The agent's own recording (``Agent(record=...)``) when the disk fills up or the file goes.

The OS refusing writes is simulated by ``RLIMIT_FSIZE`` (``EFBIG`` past the limit, ``SIGXFSZ``
ignored), as ``ENOSPC`` on a full disk; restoring the limit is the space coming back. Each
step's loss is compared with the loop's own float64 ``loss.item()``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from stiffmon import protocol as p
from stiffmon.session import read_session
from tests.agent.recording import events, offline_agent
from tests.stiffmon.test_disk_full import disk_full_at

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics")


def _loop(rec: Path) -> tuple[nn.Module, torch.optim.Optimizer, object, list[float], object]:
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 4, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
    agent = offline_agent(
        model, nn.MSELoss(), opt, rec, batch_interval=0.01, idle_batch_interval=None
    )
    own: list[float] = []

    def steps(n: int) -> None:
        for _ in range(n):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            agent.step(loss)
            own.append(loss.item())
        time.sleep(0.3)  # the publisher thread writes what it has

    return model, opt, agent, own, steps


def _losses(rec: Path) -> tuple[dict[int, float], list[p.AnyMessage]]:
    msgs, scan = read_session(rec)
    assert scan.ignored_bytes == 0
    rows: dict[int, float] = {}
    for m in msgs:
        if isinstance(m, p.Columns) and "loss" in m.names:
            rows.update(zip(m.steps.tolist(), m.column("loss").tolist(), strict=True))
    return rows, msgs


def test_a_deleted_recording_is_said_to_have_stopped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = tmp_path / "a.stiff"
    _, _, agent, own, steps = _loop(rec)
    steps(50)
    rec.unlink()  # e.g. `rm -rf runs/` mid-run: writes would go to a file no one can read
    time.sleep(1.1)  # the writer looks at the file's links at most once a second
    with caplog.at_level(logging.WARNING, logger="stiffmon_agent"):
        steps(50)
        agent.close()
    assert len(own) == 100  # training went on
    assert any("deleted while being written" in r.getMessage() for r in caplog.records)
    assert agent.publisher.unrecorded > 0


def test_recording_pauses_while_the_disk_is_full_and_resumes_saying_what_it_lost(
    tmp_path: Path,
) -> None:
    rec = tmp_path / "a.stiff"
    _, _, agent, own, steps = _loop(rec)
    steps(100)
    with disk_full_at(rec.stat().st_size + 10):
        steps(100)
    time.sleep(1.1)  # the next try to write
    steps(100)
    agent.close()
    assert len(own) == 300  # training went on
    rows, msgs = _losses(rec)
    assert all(rows[s] == own[s] for s in rows)  # bit for bit what the loop saw
    assert 299 in rows, "the steps after the space came back were not recorded"
    resumed = events(msgs, "recording-resumed")
    assert len(resumed) == 1
    lost = set(range(300)) - set(rows)
    a = resumed[0].attrs
    assert lost == set(range(a["first_step"], a["last_step"] + 1)), (lost, a)
    said = f"steps {a['first_step']} to {a['last_step']} are missing from it"
    assert resumed[0].message.endswith(said), resumed[0].message
    assert any(m.KIND == "bye" for m in msgs)
