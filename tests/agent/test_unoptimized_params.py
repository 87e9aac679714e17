"""Trainable parameters the optimizer does not hold never move: the measurements leave them out
(a linear probe whose backbone was left ``requires_grad=True``), and an EMA copy of the model,
whose parameters the optimizer holds none of, gets no preconditioned sharpness of 0."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from stiffmon_agent.metrics.state import optimized_only
from tests.agent.metrics.reference import dense_hessian_of
from tests.agent.recording import (
    EVERY_STEP,
    close_and_read,
    events,
    last_scalar,
    offline_agent,
    scalar_values,
    train_step,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(20, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (20,), generator=g
    )


def _record(tmp_path: Path, model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[Any]:
    x, y = _data()
    rec = tmp_path / "r.stiff"
    agent = offline_agent(model, nn.CrossEntropyLoss(), opt, rec, probe=(x, y), **EVERY_STEP)
    for _ in range(steps):
        train_step(agent, opt, nn.functional.cross_entropy(model(x), y))
    return close_and_read(agent, rec)


def test_a_backbone_outside_the_optimizer_is_left_out(tmp_path: Path) -> None:
    model = _model()
    head = model[2]
    opt = torch.optim.SGD(head.parameters(), lr=0.0)  # the backbone stays requires_grad=True
    msgs = _record(tmp_path, model, opt, steps=1)
    x, y = _data()
    frozen = copy.deepcopy(model)
    frozen[0].requires_grad_(False)
    h = dense_hessian_of(frozen, x, lambda out: nn.functional.cross_entropy(out, y))
    want = float(torch.linalg.eigvalsh(h)[-1])
    whole = float(
        torch.linalg.eigvalsh(
            dense_hessian_of(model, x, lambda out: nn.functional.cross_entropy(out, y))
        )[-1]
    )
    assert abs(whole - want) > 0.05 * want  # the two differ: the test can tell them apart
    assert last_scalar(msgs, "sharpness/lambda1_h") == pytest.approx(want, rel=1e-3)
    # Tr K = (1/N) Σ ‖g_i − ḡ‖² over the head's parameters only (a float64 loop)
    grads = []
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads.append(
            torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(head.parameters()))])
        )
    g = torch.stack(grads)
    trace_k = float(((g - g.mean(0)) ** 2).sum(1).mean())
    assert last_scalar(msgs, "noise/trace_k") == pytest.approx(trace_k, rel=1e-6)
    said = events(msgs, "params-not-optimized")
    assert len(said) == 1 and "2 of the model's 4" in said[0].message
    assert all(q.requires_grad for q in model.parameters())  # restored after each measurement


def test_an_ema_copy_gets_no_preconditioned_sharpness(tmp_path: Path) -> None:
    model = _model()
    ema = torch.optim.swa_utils.AveragedModel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = _data()
    for _ in range(12):  # the training model moves; the EMA copy is what the agent watches
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    msgs = _record(tmp_path, ema.module, opt, steps=1)
    precond = scalar_values(msgs, "sharpness/lambda1_precond")
    assert not precond or math.isnan(precond[-1])  # not a P⁻¹H of 0
    said = events(msgs, "params-not-optimized")
    assert len(said) == 1 and "none of the model's" in said[0].message
    assert last_scalar(msgs, "sharpness/lambda1_h") > 0


def test_optimized_only_freezes_and_restores() -> None:
    model = _model()
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)
    with optimized_only(model, opt):
        assert [q.requires_grad for q in model.parameters()] == [False, False, True, True]
    assert all(q.requires_grad for q in model.parameters())
    with optimized_only(model, torch.optim.SGD(model.parameters(), lr=0.1)):
        assert all(q.requires_grad for q in model.parameters())
