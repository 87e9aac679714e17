"""Gradient accumulation seen from the backward passes: B read from the logits is then one
micro-batch's, which the agent says once (it cannot tell which B the user meant)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from stiffmon import protocol as p
from stiffmon.session import read_session
from stiffmon_agent import Agent
from stiffmon_agent.backward_count import JUDGED_STEPS, BackwardCount


def _run(
    tmp_path: Path,
    *,
    micro: int,
    calls_per_micro: bool = False,
    reduction: str = "mean",
    batch_size: int | None = None,
    steps: int = 12,
) -> tuple[list[p.Event], Agent, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = tmp_path / "acc.stiff"
    agent = Agent(
        model,
        nn.CrossEntropyLoss(reduction=reduction),
        opt,
        endpoint="",
        registry=False,
        record=rec,
        batch_size=batch_size,
    )
    for _ in range(steps):
        for _ in range(micro):
            x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
            out = model(x)
            loss = nn.functional.cross_entropy(out, y, reduction=reduction)
            loss.backward()
            if calls_per_micro and _ < micro - 1:
                agent.step(loss, out, y)
        opt.step()
        opt.zero_grad()
        agent.step(loss, out, y)
    agent.close()
    events = [m for m in read_session(rec)[0] if isinstance(m, p.Event)]
    return events, agent, model


def _said(events: list[p.Event]) -> list[p.Event]:
    return [e for e in events if e.code == "batch-size-accumulation"]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_accumulation_with_b_from_the_logits_is_said_once(tmp_path: Path, reduction: str) -> None:
    events, agent, model = _run(tmp_path, micro=4, reduction=reduction)
    said = _said(events)
    assert len(said) == 1
    assert said[0].level == "warning"
    assert said[0].attrs == {"backwards": 4, "batch_size": 8}
    assert "4 × 8 = 32" in said[0].message
    assert ("sharpness" in said[0].message) == (reduction == "sum")
    assert said[0].step == JUDGED_STEPS  # judged at the ninth optimizer step
    assert not [e for e in events if e.code == "optimizer-step-skipped"]
    # judged once, then the hook is gone: no cost for the rest of the run
    assert agent._optimizer_columns.backwards._hook is None
    assert not model[2].bias._post_accumulate_grad_hooks


def test_agent_step_per_micro_batch_is_said_too(tmp_path: Path) -> None:
    events, _, _ = _run(tmp_path, micro=3, calls_per_micro=True, steps=14)
    said = _said(events)
    assert len(said) == 1 and said[0].attrs["backwards"] == 3
    assert not [e for e in events if e.code == "optimizer-step-skipped"]


def test_no_accumulation_or_a_given_batch_size_says_nothing(tmp_path: Path) -> None:
    assert not _said(_run(tmp_path, micro=1)[0])
    events, agent, model = _run(tmp_path, micro=4, batch_size=32, steps=3)
    assert not _said(events)
    assert agent._optimizer_columns.backwards._hook is None  # never counted
    assert not model[2].bias._post_accumulate_grad_hooks


def test_an_agent_closed_before_judging_leaves_no_hook(tmp_path: Path) -> None:
    events, _, model = _run(tmp_path, micro=2, steps=3)
    assert not _said(events)
    assert not model[2].bias._post_accumulate_grad_hooks


def test_the_usual_count_skips_a_partial_first_cycle_and_ties_go_to_the_smaller() -> None:
    w = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([w], lr=0.1)
    count = BackwardCount()
    count.attach(opt)
    opt.register_step_pre_hook(lambda *_: count.on_optimizer_step())  # as OptimizerColumns
    cycles = [7] + [2, 1] * (JUDGED_STEPS // 2)  # the first: an agent made mid-cycle
    for n in cycles:
        for _ in range(n):
            (w * 2).sum().backward()
        opt.step()
    assert count.usual == 1
    assert count._hook is None


def test_backward_passes_inside_the_optimizer_step_are_not_accumulation(tmp_path: Path) -> None:
    """L-BFGS evaluates its closure (a backward pass each) inside ``optimizer.step()``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=5)
    rec = tmp_path / "lbfgs.stiff"
    agent = Agent(model, nn.CrossEntropyLoss(), opt, endpoint="", registry=False, record=rec)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for _ in range(12):

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        agent.step(loss, model(x), y)
    assert agent._optimizer_columns.backwards.usual == 0
    agent.close()
    assert not _said([m for m in read_session(rec)[0] if isinstance(m, p.Event)])
