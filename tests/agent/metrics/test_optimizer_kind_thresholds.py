"""Thresholds of subclassed optimizers and ASGD against the optimizers' real steps.

The reference is torch's own optimizer stepping on f(x) = ½ λ x² in float64: a bound is right
iff the optimizer converges at 0.99 × it and diverges at 1.01 × it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from stiffmon_agent.metrics import (
    diagonal_preconditioner,
    preconditioned_threshold_for,
    stability_threshold_for,
)
from stiffmon_agent.metrics.optimizer_kind import optimizer_kind
from tests.agent.metrics.reference import quadratic_growth
from tests.agent.recording import (
    EVERY_STEP,
    close_and_read,
    events,
    last_scalar,
    offline_agent,
    train_step,
)

STEPS = 600
X0 = 1e-20  # tiny: Adam's v (≈ (λx)²) stays ≪ ε², so P stays put


class PlainSGD(torch.optim.SGD):
    """A subclass that keeps SGD's step (adds a method only)."""

    def describe(self) -> str:
        return "mine"


class ClippingSGD(torch.optim.SGD):
    """A subclass whose step is not SGD's (it clips the gradient first)."""

    def step(self, closure: Any = None) -> Any:
        for g in self.param_groups:
            torch.nn.utils.clip_grad_norm_(g["params"], 1e-3)
        return super().step(closure)


class PlainAdamW(torch.optim.AdamW):
    pass


def _check_boundary(make: Callable[[nn.Parameter], torch.optim.Optimizer], value: float) -> None:
    for factor, stable in ((0.99, True), (1.01, False)):
        x = nn.Parameter(torch.tensor([X0], dtype=torch.float64))
        final = quadratic_growth(make(x), x, factor * value, STEPS)
        assert (final < 1e-2) == stable, (factor, final)
        assert (final > 1e2) == (not stable), (factor, final)


def test_a_subclass_that_keeps_sgds_step_gets_its_bound() -> None:
    def make(x: nn.Parameter) -> torch.optim.Optimizer:
        return PlainSGD([x], lr=0.05, momentum=0.9, weight_decay=0.5)

    opt = make(nn.Parameter(torch.zeros(1, dtype=torch.float64)))
    thr = stability_threshold_for(opt)
    assert thr.value == pytest.approx(3.8 / 0.05 - 0.5, rel=1e-12)
    assert thr.rule == "(2+2β)/η - wd (PlainSGD: SGD's step, group 0)"
    _check_boundary(make, thr.value)


def test_a_subclass_that_overrides_step_gets_none_and_why() -> None:
    opt = ClippingSGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    thr = stability_threshold_for(opt)
    assert thr.value is None
    assert "ClippingSGD subclasses torch.optim.SGD but overrides step()" in thr.rule
    assert optimizer_kind(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)).rule == "SGD"


def test_a_subclass_of_adamw_gets_its_preconditioner_and_bound() -> None:
    x = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = PlainAdamW([x], lr=0.01, weight_decay=0.0)
    x.grad = torch.ones_like(x)
    opt.step()
    diag, why = diagonal_preconditioner(opt, [x])
    assert diag is not None, why
    thr = preconditioned_threshold_for(opt)
    assert thr.value == pytest.approx(3.8 / (0.1 * 0.01), rel=1e-12)
    assert "PlainAdamW: AdamW's step" in thr.rule
    assert "PlainAdamW: AdamW's step is adaptive" in stability_threshold_for(opt).rule


@pytest.mark.parametrize(
    "settings, t",
    [
        ({"lr": 0.01}, 10**6),  # the defaults after 1e6 steps: η_t = 0.59 lr
        ({"lr": 1.0, "lambd": 1.0, "alpha": 0.01, "weight_decay": 0.3}, 10**7),  # λ η_t = 0.85
        ({"lr": torch.tensor(0.1), "lambd": 1e-3, "foreach": True}, 10**5),  # a tensor lr
    ],
)
def test_asgd_bound_uses_its_decayed_step_size(settings: dict[str, Any], t: int) -> None:
    """ASGD steps θ ← (1 − λη_t) θ − η_t (g + wd θ), η_t = lr/(1 + λ·lr·t)^α: 2/η_t − wd − λ."""

    def make(x: nn.Parameter) -> torch.optim.Optimizer:
        opt = torch.optim.ASGD([x], **settings)
        x.grad = torch.zeros_like(x)
        opt.step()  # makes the state; then t steps on (η_t barely moves over STEPS more)
        g, st = opt.param_groups[0], opt.state[x]
        lr = float(g["lr"])
        st["step"].fill_(t)
        st["eta"].fill_(lr / (1 + g["lambd"] * lr * t) ** g["alpha"])
        return opt

    x = nn.Parameter(torch.tensor([X0], dtype=torch.float64))
    opt = make(x)
    thr = stability_threshold_for(opt)
    assert thr.value is not None, thr.rule
    assert "ASGD's decayed step size" in thr.rule
    assert abs(thr.value - 2 / float(settings["lr"])) > 0.4 * thr.value  # not 2/lr
    _check_boundary(make, thr.value)


def test_sgd_with_a_tensor_lr() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=torch.tensor(0.1), momentum=0.9)
    assert stability_threshold_for(opt).value == pytest.approx(38.0, rel=1e-6)


def test_other_adaptive_optimizers_say_why_there_is_no_bound() -> None:
    x = nn.Parameter(torch.zeros(1))
    for cls in (torch.optim.Rprop, torch.optim.LBFGS):
        thr = stability_threshold_for(cls([x]))
        assert thr.value is None
        assert "sign-based" in thr.rule or "quasi-Newton" in thr.rule
        assert "λ1(P⁻¹H)" not in thr.rule  # it has none
    for cls in (
        torch.optim.NAdam,
        torch.optim.RAdam,
        torch.optim.Adamax,
        torch.optim.Adagrad,
        torch.optim.Adadelta,
    ):  # they have one
        assert "see λ1(P⁻¹H)" in stability_threshold_for(cls([x])).rule


@pytest.mark.parametrize("kind", ["Adam", "RMSprop"])
def test_layerwise_learning_rates_fold_into_p(kind: str) -> None:
    """Groups at η = 0.01 and 0.001 (layer-wise rates), the sharp direction in the slow group:
    P of the slow group is scaled by η_max/η_g = 10, so λ1(P⁻¹H) meets the fast group's bound
    exactly where the iteration diverges (before: 10× above it while converging); a group at
    η = 0 does not move and gets P = ∞."""
    cls = getattr(torch.optim, kind)
    extra: dict[str, Any] = {"eps": 1.0}  # ε ≫ √v: P stays 1 (× the scale)
    probe = cls([{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in (0.01, 1e-3)])
    thr = preconditioned_threshold_for(probe)
    assert thr.value is not None and thr.group == 0
    for factor, stable in ((0.99, True), (1.01, False)):
        xs = [nn.Parameter(torch.tensor([X0], dtype=torch.float64)) for _ in range(3)]
        lrs = (0.01, 1e-3, 0.0)
        opt = cls([{"params": [x], "lr": lr, **extra} for x, lr in zip(xs, lrs, strict=True)])
        for _ in range(300):  # zero gradients: v stays 0, Adam's 1 − β1^t → 1
            for x in xs:
                x.grad = torch.zeros_like(x)
            opt.step()
        diag, why = diagonal_preconditioner(opt, xs)
        assert diag is not None, why
        assert float(diag[1]) == pytest.approx(10 * float(diag[0]), rel=1e-12)
        assert math.isinf(float(diag[2]))
        lam = [1.0, factor * thr.value * float(diag[1]), 1.0]  # λ1(P⁻¹H) = factor × threshold
        for _ in range(STEPS):
            for c, x in zip(lam, xs, strict=True):
                x.grad = c * x.detach()
            opt.step()
        final = max(float(x.detach().abs().max()) for x in xs[:2]) / X0
        assert (final < 1e-2) == stable, (kind, factor, final)
        assert (final > 1e2) == (not stable), (kind, factor, final)


@pytest.mark.parametrize("cls", [PlainSGD, ClippingSGD])
def test_the_agent_publishes_a_subclass_bound_or_says_why_not(tmp_path: Path, cls: type) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.arange(8) % 2
    opt = cls(model.parameters(), lr=0.1, momentum=0.9)
    rec = tmp_path / "sub.stiff"
    agent = offline_agent(model, nn.CrossEntropyLoss(), opt, rec, probe=(x, y), **EVERY_STEP)
    for _ in range(2):
        train_step(agent, opt, nn.functional.cross_entropy(model(x), y))
    msgs = close_and_read(agent, rec)
    thr = last_scalar(msgs, "sharpness/threshold")
    if cls is PlainSGD:
        assert thr == pytest.approx(38.0, rel=1e-12)
    else:
        assert math.isnan(thr)
        (note,) = events(msgs, "threshold-none")
        assert "ClippingSGD subclasses torch.optim.SGD but overrides step()" in note.message
