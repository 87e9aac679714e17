"""The per-step path's shortcuts give what the long way gave: the next due step of each schedule,
the optimizer's columns read from where they live, and a custom schedule asked at every step."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from stiffmon import protocol as p
from stiffmon.session import read_session
from stiffmon_agent import Agent, EveryK, FirstNThenEveryK, LogSpaced, Never
from stiffmon_agent.optimizer_read import optimizer_columns
from stiffmon_agent.schedules import Schedule, next_due
from stiffmon_agent.step_scalars import RECHECK_STEPS, OptimizerColumns

SCHEDULES = st.one_of(
    st.builds(EveryK, st.integers(1, 60), st.integers(0, 200)),
    st.builds(LogSpaced, st.integers(1, 25)),
    st.builds(FirstNThenEveryK, st.integers(0, 30), st.integers(1, 60)),
    st.just(Never()),
)


@settings(max_examples=300, deadline=None)
@given(SCHEDULES, st.integers(0, 5000))
def test_next_due_is_the_first_due_step_found_one_by_one(sched: Schedule, step: int) -> None:
    expected = next((t for t in range(step, step + 20_000) if sched.due(t)), None)
    assert next_due(sched, step) == expected


def probe_agent(gram_every: Schedule | int, sharpness_every: Schedule | int) -> Agent:
    """A linear model with a 6-example probe, not publishing; no density measurements."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    return Agent(
        model,
        nn.CrossEntropyLoss(),
        torch.optim.SGD(model.parameters(), lr=0.1),
        probe=(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])),
        endpoint="",
        registry=False,
        gram_every=gram_every,
        sharpness_every=sharpness_every,
        density_every="never",
    )


@dataclass
class Asked:
    """A schedule of the user's own (no ``next_due``): due at steps 3 and 7, records the asks."""

    asked: list[int] = field(default_factory=list)

    def due(self, step: int) -> bool:
        self.asked.append(step)
        return step in (3, 7)


def test_a_schedule_without_next_due_is_asked_at_every_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from stiffmon_agent import agent as agent_module

    made: list[tuple[str, int]] = []
    monkeypatch.setattr(
        agent_module.MeasurementRunner, "measure", lambda self, kind, s: made.append((kind, s))
    )
    sched = Asked()
    agent = probe_agent(gram_every=sched, sharpness_every=EveryK(4, start=2))
    for _ in range(10):
        agent.step(0.5)
    agent.close()
    assert sched.asked == list(range(10))
    assert made == [("sharpness", 2), ("gram", 3), ("sharpness", 6), ("gram", 7)]


def _columns_by_step(
    opt: torch.optim.Optimizer, steps: int, change: object
) -> list[dict[str, float]]:
    cols = OptimizerColumns(opt)
    out = []
    for s in range(steps):
        change(s)  # type: ignore[operator]
        values = cols.values()
        names, expected = optimizer_columns(opt)
        assert cols.names == tuple(names) and values == expected, f"step {s}"
        out.append(dict(zip(cols.names, values, strict=True)))
    return out


def test_optimizer_columns_follow_every_change() -> None:
    w = [nn.Parameter(torch.zeros(2)) for _ in range(3)]
    opt = torch.optim.SGD([w[0]], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def change(s: int) -> None:
        if s:
            opt.step()
            sched.step()  # a new lr every step, in place
        if s == 3:
            opt.param_groups[0]["weight_decay"] = 0.01  # raised by a schedule: seen at once
        if s == 5:
            opt.add_param_group({"params": [w[1]], "lr": 0.3})  # a new group: new columns

    rows = _columns_by_step(opt, 8, change)
    assert [r["lr/0"] for r in rows] == pytest.approx([0.1 * 0.5**s for s in range(8)])
    assert [r["weight_decay/0"] for r in rows] == [0.0] * 3 + [0.01] * 5
    assert "lr/1" not in rows[4] and rows[5]["lr/1"] == 0.3


def test_optimizer_columns_notice_a_group_edited_in_place_within_recheck_steps() -> None:
    w = nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([w], lr=1e-3, betas=(0.8, 0.95))
    cols = OptimizerColumns(opt)
    assert cols.values() == [1e-3, 0.8, 0.95, 0.0] and cols.names[1:3] == ("momentum/0", "beta2/0")
    opt.param_groups[0]["betas"] = (0.7, 0.9)  # a new tuple: read at the next step
    assert cols.values()[1:3] == [0.7, 0.9]
    del opt.param_groups[0]["weight_decay"]  # a key removed (nobody does this): noticed later
    for _ in range(RECHECK_STEPS):
        cols.values()
    assert "weight_decay/0" not in cols.names


@pytest.mark.parametrize("order", ["scheduler-first", "agent-first"])
def test_an_lr_schedule_reaches_the_file_step_by_step(tmp_path: Path, order: str) -> None:
    """Each step's ``lr/0`` is the learning rate its ``optimizer.step()`` used, and so is the
    stability threshold of a measurement at that step, whether ``scheduler.step()`` comes
    before ``agent.step()`` or after it."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=60)
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    rec = tmp_path / "lr.stiff"
    agent = Agent(
        model, nn.CrossEntropyLoss(), opt, probe=(x, y), endpoint="", record=rec,
        registry=False, gram_every="never", sharpness_every=10, overhead_cap=None,
    )  # fmt: skip
    used, momenta = [], []
    for i in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        used.append(opt.param_groups[0]["lr"])
        momenta.append(opt.param_groups[0]["momentum"])  # OneCycle cycles it too
        opt.step()
        if order == "agent-first":
            agent.step(0.5)
        if i < 59:
            sched.step()
        if order == "scheduler-first":
            agent.step(0.5)
    agent.close()
    msgs = read_session(rec)[0]
    batches = [m for m in msgs if isinstance(m, p.Columns)]
    np.testing.assert_array_equal(np.concatenate([m.column("lr/0") for m in batches]), used)
    np.testing.assert_array_equal(
        np.concatenate([m.column("momentum/0") for m in batches]), momenta
    )
    assert all("weight_decay/0" in m.names for m in batches)
    thresholds = {
        m.step: m.as_dict()["sharpness/threshold"]
        for m in msgs
        if isinstance(m, p.Scalars) and "sharpness/threshold" in m.names
    }
    assert sorted(thresholds) == list(range(0, 60, 10))
    for s, thr in thresholds.items():  # (2 + 2β) / η of the step's own η and β
        assert thr == pytest.approx((2 + 2 * momenta[s]) / used[s], rel=1e-12)


def test_steps_without_an_optimizer_step_read_the_values_as_they_are() -> None:
    """Gradient accumulation: agent.step() at micro-steps without an optimizer step reads the
    current values; a closed agent leaves no hook on the optimizer."""
    w = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=0.1)
    cols = OptimizerColumns(opt)
    cols.attach()
    w.grad = torch.zeros(2)
    opt.step()
    opt.param_groups[0]["lr"] = 0.2
    assert cols.values()[0] == 0.1  # the step's
    assert cols.stepped_groups()[0]["lr"] == 0.1  # type: ignore[index]
    assert cols.values()[0] == 0.2  # no step since: as it is now, and so the threshold
    assert cols.stepped_groups()[0]["lr"] == 0.2  # type: ignore[index]
    agent = Agent(nn.Linear(2, 2), nn.MSELoss(), opt, endpoint="", registry=False)
    assert len(opt._optimizer_step_pre_hooks) == 2
    agent.close()
    cols.remove_hook()
    assert not opt._optimizer_step_pre_hooks


def test_an_optimizer_that_cannot_be_read_gives_no_columns_not_a_crash() -> None:
    w = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=0.1)
    cols = OptimizerColumns(opt)
    assert cols.values() == [0.1, 0.0, 0.0]
    del opt.param_groups[0]["lr"]  # an optimizer of the user's own without an lr
    assert cols.values() == [] and cols.names == ()
    agent = Agent(nn.Linear(2, 2), nn.MSELoss(), opt, endpoint="", registry=False)
    agent.step(0.5)  # the training loop goes on
    assert agent.step_count == 1
    agent.close()


def test_agent_step_before_optimizer_step_is_noticed(tmp_path: Path) -> None:
    """``agent.step(); optimizer.step(); scheduler.step()``: from the fourth step on each row
    reads the values as they are (those the coming step uses), with one warning event; rows 1
    and 2 carry the previous step's (the hook's, read for the usual order)."""
    w = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    rec = tmp_path / "before.stiff"
    agent = Agent(nn.Linear(2, 2), nn.MSELoss(), opt, endpoint="", record=rec, registry=False)
    used = []
    for _ in range(7):
        w.grad = torch.ones(2)
        agent.step(0.5)
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    agent.close()
    msgs = read_session(rec)[0]
    got = np.concatenate([m.column("lr/0") for m in msgs if isinstance(m, p.Columns)])
    np.testing.assert_array_equal(got[[0, 3, 4, 5, 6]], np.asarray(used)[[0, 3, 4, 5, 6]])
    np.testing.assert_array_equal(got[1:3], used[:2])
    said = [m for m in msgs if isinstance(m, p.Event) and m.code == "step-order"]
    assert len(said) == 1 and said[0].step == 3 and "before optimizer.step()" in said[0].message


def test_tensor_lr_rows_are_copies_and_unreadable_values_are_nan(tmp_path: Path) -> None:
    """A tensor lr changed in place by the scheduler: each row keeps the value of its step, at
    micro-steps too; an optimizer whose group has ``lr=None`` gives NaN, and its measurements
    go on."""
    model = nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-3))
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    rec = tmp_path / "tensor.stiff"
    agent = Agent(model, nn.CrossEntropyLoss(), opt, endpoint="", record=rec, registry=False)
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    expected = []
    for s in range(6):
        nn.functional.cross_entropy(model(x), y).backward()
        expected.append(float(opt.param_groups[0]["lr"]))
        if s % 2:
            opt.step()
            opt.zero_grad()
        agent.step(0.5)
        if s % 2:
            sched.step()
    agent.close()
    got = np.concatenate(
        [m.column("lr/0") for m in read_session(rec)[0] if isinstance(m, p.Columns)]
    )
    np.testing.assert_array_equal(got, expected)

    class NoLR(torch.optim.Optimizer):
        def __init__(self, params: Any) -> None:
            super().__init__(params, {"lr": None, "momentum": None, "weight_decay": 0.0})

        def step(self, closure: Any = None) -> None:
            return None

    opt2 = NoLR(model.parameters())
    rec2 = tmp_path / "nolr.stiff"
    agent = Agent(
        model, nn.CrossEntropyLoss(), opt2, probe=(x, y), endpoint="", record=rec2,
        registry=False, gram_every="never", sharpness_every=1, overhead_cap=None,
    )  # fmt: skip
    for _ in range(3):
        opt2.step()
        agent.step(0.5)
    assert not agent.disabled
    agent.close()
    msgs = read_session(rec2)[0]
    assert all(np.isnan(m.column("lr/0")).all() for m in msgs if isinstance(m, p.Columns))
    assert sum(isinstance(m, p.Scalars) and "sharpness/lambda1_h" in m.names for m in msgs) == 3


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_an_agent_made_mid_run_is_not_taken_for_the_wrong_order(
    tmp_path: Path, momentum: float
) -> None:
    """Made between an optimizer step and its ``agent.step()`` (lazily, in the loop): the first
    call sees no optimizer step, then one per call, like ``agent.step()`` before
    ``optimizer.step()``; the optimizer's state (momentum) or its parameters' gradients (plain
    SGD keeps no state) say it has stepped, so nothing is judged."""
    w = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=0.1, momentum=momentum)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    rec = tmp_path / "lazy.stiff"
    agent = None
    used = []
    for _ in range(7):
        w.grad = torch.ones(2)
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if agent is None:
            agent = Agent(
                nn.Linear(2, 2), nn.MSELoss(), opt, endpoint="", record=rec, registry=False
            )
        agent.step(0.5)
    assert agent is not None
    agent.close()
    msgs = read_session(rec)[0]
    got = np.concatenate([m.column("lr/0") for m in msgs if isinstance(m, p.Columns)])
    np.testing.assert_array_equal(got[1:], used[1:])  # the first: read as it is (no hook yet)
    assert not [m for m in msgs if isinstance(m, p.Event) and m.code == "step-order"]


def test_every_kind_of_loss_reaches_the_file_as_its_value_at_the_step(tmp_path: Path) -> None:
    """A CPU scalar loss is read at ``step()`` (later in-place changes do not reach the row),
    with or without grad, in float32, float64 and bfloat16; a number as it is; a loss that is
    no scalar (a per-example vector passed by mistake) is NaN, and the run goes on."""
    x = torch.tensor([0.1, 0.2], requires_grad=True)
    reused = torch.tensor(1.5)
    losses: list[Any] = [
        (x**2).sum(),  # requires grad
        torch.tensor(2.25, dtype=torch.float64),
        torch.tensor(3.5, dtype=torch.bfloat16),
        reused,
        7,
        torch.tensor([1.0, 2.0]),  # not a scalar
        torch.tensor([[4.75]]),  # one element, not 0-d
    ]
    expected = [0.05, 2.25, 3.5, 1.5, 7.0, np.nan, 4.75]
    rec = tmp_path / "losses.stiff"
    agent = Agent(nn.Linear(2, 2), nn.MSELoss(), None, endpoint="", record=rec, registry=False)
    for loss in losses:
        agent.step(loss)
    reused.fill_(99.0)  # the row of its step keeps 1.5
    agent.close()
    got = np.concatenate(
        [m.column("loss") for m in read_session(rec)[0] if isinstance(m, p.Columns)]
    )
    np.testing.assert_allclose(got, expected, rtol=1e-7)
