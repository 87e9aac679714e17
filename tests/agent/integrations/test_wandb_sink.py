"""The W&B mirror (``log_to_wandb``) against a fake ``wandb`` module that records its calls.

Every value it logs must be the recorded session's value at the same step, bit for bit, and the
mirrored λ1_H must agree with a float64 dense Hessian; W&B failing or absent must leave training
going on with one warning event.
"""

from __future__ import annotations

import math
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from stiffmon import protocol as p
from stiffmon_agent.integrations.wandb import log_to_wandb
from tests.agent.metrics.reference import dense_hessian_of
from tests.agent.recording import EXACT, close_and_read, events, offline_agent, train_step


class FakeTable:
    def __init__(self, columns: list[str], data: list[list[Any]]) -> None:
        self.columns, self.data = columns, data


class FakeRun:
    def __init__(self, fail: bool = False) -> None:
        self.rows: list[dict[str, Any]] = []
        self.defined: list[tuple[str, dict[str, Any]]] = []
        self.fail = fail

    def log(self, row: dict[str, Any]) -> None:
        if self.fail:
            raise RuntimeError("the run has finished")
        self.rows.append(dict(row))

    def define_metric(self, name: str, **kw: Any) -> None:
        self.defined.append((name, kw))


def _module(run: Any) -> Any:
    return types.SimpleNamespace(run=run, Table=FakeTable)


def _train(
    tmp_path: Path, module: Any, steps: int = 6, pause: float = 0.0, **options: Any
) -> tuple[list[Any], Any]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.arange(12) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    rec = tmp_path / "run.stiff"
    agent = offline_agent(
        model, loss_fn, opt, rec, probe=(x, y), class_names=["a", "b", "c"], **EXACT
    )
    sink = log_to_wandb(agent, module=module, interval=0.05, **({"per_step": True} | options))
    for _ in range(steps):
        out = model(x)
        train_step(agent, opt, loss_fn(out, y).mean(), out, y)
        time.sleep(pause)  # the publisher drains, the next step flushes to W&B
    msgs = close_and_read(agent, rec)
    h = dense_hessian_of(model, x, lambda out: loss_fn(out, y).mean())
    return msgs, (sink, float(torch.linalg.eigvalsh(h)[-1]))


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _logged(run: FakeRun) -> dict[tuple[int, str], Any]:
    out: dict[tuple[int, str], Any] = {}
    for row in run.rows:
        step = row["stiffmon/step"]
        for k, v in row.items():
            if k != "stiffmon/step":
                out[(step, k)] = v
    return out


def test_every_value_is_the_recorded_one_bit_for_bit(tmp_path: Path) -> None:
    run = FakeRun()
    msgs, (sink, lam_ref) = _train(tmp_path, _module(run))
    logged = _logged(run)
    expected: dict[tuple[int, str], float] = {}
    for m in msgs:
        if isinstance(m, p.Scalars):
            for n, v in zip(m.names, m.values.tolist(), strict=True):
                expected[(m.step, f"stiffmon/{n}")] = v
        elif isinstance(m, p.Columns):
            for n, col in zip(m.names, m.values, strict=True):
                for s, v in zip(m.steps.tolist(), col.tolist(), strict=True):
                    if not (n == "accuracy" and math.isnan(v)):
                        expected[(s, f"stiffmon/{n}")] = v
    scalars = {k: v for k, v in logged.items() if not isinstance(v, FakeTable)}
    assert scalars.keys() == expected.keys()
    wrong = {k: (scalars[k], v) for k, v in expected.items() if not _same(scalars[k], v)}
    assert not wrong
    assert sink.dropped == 0 and sink.stopped is None
    assert ("stiffmon/*", {"step_metric": "stiffmon/step"}) in run.defined
    # λ1_H at the last measured step (the final weights) against a float64 dense Hessian
    lam = max((s, v) for (s, k), v in scalars.items() if k == "stiffmon/sharpness/lambda1_h")[1]
    assert abs(lam - lam_ref) / abs(lam_ref) < 1e-6
    # matrices: the recorded data, labelled
    matrices = [m for m in msgs if isinstance(m, p.Matrix)]
    assert matrices
    for m in matrices:
        table = logged[(m.step, f"stiffmon/{m.name}")]
        assert table.columns[1:] == (list(m.col_labels) or [str(j) for j in range(3)])
        got = np.array([r[1:] for r in table.data], dtype=np.float64)
        assert np.array_equal(got, m.data, equal_nan=True)


def test_a_failing_run_says_so_once_and_training_goes_on(tmp_path: Path) -> None:
    run = FakeRun(fail=True)
    msgs, (sink, _) = _train(tmp_path, _module(run), steps=4, pause=0.6)
    said = events(msgs, "wandb-failed")
    assert 1 <= len(said) <= 2 and "training goes on" in said[0].message
    assert sink.stopped is not None and sink.rows == 0
    assert any(isinstance(m, p.Bye) for m in msgs)


def test_no_active_run_is_one_event(tmp_path: Path) -> None:
    msgs, (sink, _) = _train(tmp_path, types.SimpleNamespace(run=None), steps=2)
    assert sink is None
    (said,) = events(msgs, "wandb-off")
    assert "wandb.init()" in said.message


def test_wandb_not_installed_is_one_event(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # ``import wandb`` raises ImportError
    msgs, (sink, _) = _train(tmp_path, None, steps=2)
    assert sink is None
    (said,) = events(msgs, "wandb-off")
    assert "cannot be imported" in said.message


def test_big_matrices_are_said_not_logged(tmp_path: Path) -> None:
    run = FakeRun()
    msgs, _ = _train(tmp_path, _module(run), steps=3, pause=0.6, max_cells=4)
    # said while the session is open (what only the last flush, at close, finds is said on
    # the console alone)
    assert not any(isinstance(v, FakeTable) for row in run.rows for v in row.values())
    assert events(msgs, "wandb-matrix")
