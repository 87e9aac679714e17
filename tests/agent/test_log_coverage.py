"""Agent.log (user scalars), B from the logits, and measurement coverage (done / skipped)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from stiffmon import protocol as p
from stiffmon.session import read_session
from stiffmon_agent import Agent
from stiffmon_agent import agent as agent_module
from stiffmon_agent.userlog import log_spaced
from tests.agent.recording import train_step


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def console() -> Iterator[Records]:
    h = Records()
    level = agent_module.log.level
    agent_module.log.addHandler(h)
    agent_module.log.setLevel(logging.INFO)
    yield h
    agent_module.log.removeHandler(h)
    agent_module.log.setLevel(level)


def setup(
    tmp_path: Path, name: str = "r.stiff", **kwargs: Any
) -> tuple[Agent, nn.Module, torch.optim.Optimizer, Path]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(
        [
            {"params": model[0].parameters(), "lr": 1e-3},
            {"params": model[2].parameters(), "lr": 1e-2},
        ]
    )
    rec = tmp_path / name
    agent = Agent(model, nn.CrossEntropyLoss(), opt, endpoint="", record=rec, **kwargs)
    return agent, model, opt, rec


def train(agent: Agent, model: nn.Module, opt: torch.optim.Optimizer, steps: int, b: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(b, 4, generator=g), torch.randint(0, 3, (b,), generator=g)
        out = model(x)
        train_step(agent, opt, nn.functional.cross_entropy(out, y), out, y)


def scalars(msgs: list[p.AnyMessage], prefix: str) -> dict[tuple[int, str], float]:
    return {
        (m.step, n): v
        for m in p.expand_columns(msgs)
        if isinstance(m, p.Scalars)
        for n, v in m.as_dict().items()
        if n.startswith(prefix)
    }


def test_log_spaced() -> None:
    assert [n for n in range(1, 1001) if log_spaced(n)] == [
        1,
        2,
        5,
        10,
        20,
        50,
        100,
        200,
        500,
        1000,
    ]
    assert not log_spaced(0)


def test_log_publishes_custom_scalars(tmp_path: Path, console: Records) -> None:
    agent, model, opt, rec = setup(tmp_path)
    agent.log(val_loss=0.5)  # before any step: step 0
    train(agent, model, opt, 3, 8)

    class Bad:
        def __float__(self) -> float:
            raise RuntimeError("no")

    agent.log(val_loss=torch.tensor(0.25), val_acc=1, **{"val/top-5": torch.tensor([0.75])})
    agent.log(step=10, inf=math.inf, nan=math.nan, bad=Bad(), flag=True)
    agent.log(**{"no spaces": 1.0, "": 2.0}, vec=torch.ones(3), text="x", none=None)
    agent.log(**{"no spaces": 1.0})  # warned once per name
    agent.log(step=-3, ok=1.5)  # a bad step: the current step instead
    agent.close()
    agent.log(late=1.0)  # after close: ignored, no error
    custom = scalars(read_session(rec)[0], "custom/")
    assert custom[(0, "custom/val_loss")] == 0.5
    assert custom[(2, "custom/val_loss")] == 0.25
    assert custom[(2, "custom/val_acc")] == 1.0
    assert custom[(2, "custom/val/top-5")] == 0.75
    assert math.isnan(custom[(10, "custom/inf")]) and math.isnan(custom[(10, "custom/nan")])
    assert math.isnan(custom[(10, "custom/bad")]) and custom[(10, "custom/flag")] == 1.0
    assert custom[(2, "custom/ok")] == 1.5
    names = {n for _, n in custom}
    assert names == {f"custom/{n}" for n in ("val_loss", "val_acc", "val/top-5", "inf", "nan")} | {
        "custom/bad",
        "custom/flag",
        "custom/ok",
    }
    dropped = [line for line in console.lines if "Agent.log dropped" in line]
    assert len(dropped) == 5 and sum("'no spaces'" in line for line in dropped) == 1
    assert any("shape (3,)" in line for line in dropped)


def test_batch_size_from_the_logits(tmp_path: Path) -> None:
    agent, model, opt, rec = setup(tmp_path)
    train(agent, model, opt, 3, 8)
    agent.step(torch.tensor(1.0))  # no logits: no B this step
    agent.close()
    msgs = read_session(rec)[0]
    assert scalars(msgs, "batch_size") == {(s, "batch_size"): 8.0 for s in range(3)}
    hello = next(m for m in msgs if isinstance(m, p.Hello))
    assert hello.batch_size is None

    agent, model, opt, rec2 = setup(tmp_path, "given.stiff", batch_size=32)
    train(agent, model, opt, 2, 8)
    agent.close()
    msgs = read_session(rec2)[0]
    assert not scalars(msgs, "batch_size")
    assert next(m for m in msgs if isinstance(m, p.Hello)).batch_size == 32


def test_overhead_cap_coverage_is_published_and_said(tmp_path: Path, console: Records) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = (torch.randn(12, 4), torch.arange(12) % 3)
    rec = tmp_path / "r.stiff"
    agent = Agent(
        model,
        nn.CrossEntropyLoss(),
        opt,
        probe=probe,
        endpoint="",
        record=rec,
        gram_every=1,
        sharpness_every="never",
        overhead_cap=1e-9,  # nothing but the step-0 measurement fits
    )
    train(agent, model, opt, 25, 8)
    agent.close()
    msgs = read_session(rec)[0]
    cov = scalars(msgs, "coverage/")
    assert {n for _, n in cov} == {"coverage/gram/done", "coverage/gram/skipped"}
    for s in range(25):  # published at every due step, cumulative
        assert cov[(s, "coverage/gram/done")] == 1.0
        assert cov[(s, "coverage/gram/skipped")] == s
    events = [m for m in msgs if isinstance(m, p.Event) and m.code == "measurement-skipped"]
    assert [e.attrs["skipped"] for e in events] == [1, 2, 5, 10, 20]
    assert {(e.attrs["kind"], e.attrs["reason"]) for e in events} == {("gram", "overhead-cap")}
    assert [e.step for e in events] == [1, 2, 5, 10, 20]
    said = [line for line in console.lines if "skipping due gram" in line]
    assert len(said) == 5 and "(20 skipped so far, 1 done)" in said[-1]


def test_disabled_metric_coverage(
    tmp_path: Path, console: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("unsupported layer")

    monkeypatch.setattr(agent_module, "sharpness_messages", broken)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = tmp_path / "r.stiff"
    agent = Agent(
        model,
        nn.CrossEntropyLoss(),
        opt,
        probe=(torch.randn(12, 4), torch.arange(12) % 3),
        endpoint="",
        record=rec,
        gram_every="never",
        sharpness_every=2,
        overhead_cap=None,
    )
    train(agent, model, opt, 12, 8)  # due at 0 (fails), 2, 4, 6, 8, 10 (disabled)
    agent.close()
    msgs = read_session(rec)[0]
    cov = scalars(msgs, "coverage/sharpness/")
    assert sorted(s for s, n in cov if n.endswith("skipped")) == [0, 2, 4, 6, 8, 10]
    assert (
        cov[(10, "coverage/sharpness/skipped")] == 6 and cov[(10, "coverage/sharpness/done")] == 0
    )
    codes = [m.code for m in msgs if isinstance(m, p.Event)]
    assert codes[:2] == ["metric-error", "metric-disabled"]
    skipped = [m for m in msgs if isinstance(m, p.Event) and m.code == "measurement-skipped"]
    assert [(e.step, e.attrs["reason"], e.attrs["skipped"]) for e in skipped] == [
        (2, "disabled", 1),
        (4, "disabled", 2),
        (10, "disabled", 5),
    ]
    assert any("disabled after an error (5 skipped so far, 0 done)" in s for s in console.lines)
