"""The agent with optimizers and loops beyond SGD / Adam, against float64 references.

* Adam's coupled L2 and Adagrad: λ1(P⁻¹(H + wd)) against the dense D (H + wd) D with
  D = P^{-1/2} from the optimizer's own state (P = √s + ε for Adagrad).
* LBFGS (closure-based step): the agent steps with it, λ1_H is the dense one, and the
  threshold is NaN with a reason on screen (quasi-Newton: no curvature bound).
* Rprop, a hand-written Lion, SAM, Lookahead: no bound, each with its reason; Lion, Rprop and
  LBFGS do not diverge on ½ λ x² at λ = 10⁶, where a curvature bound would have to say so.
* Gradient accumulation with a scheduler stepping per micro-batch, lr set by hand and
  ReduceLROnPlateau: each step's threshold is 2/η of the lr that step's optimizer.step() used.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from stiffmon_agent.metrics.preconditioner import diagonal_preconditioner
from stiffmon_agent.metrics.thresholds import stability_threshold_for
from tests.agent.metrics.reference import TINY, dense_hessian_of
from tests.agent.recording import (
    EVERY_STEP,
    EXACT,
    close_and_read,
    events,
    last_scalar,
    metric_errors,
    offline_agent,
    scalar_values,
    train_step,
)

SETTINGS = EXACT | EVERY_STEP | {"gram_every": "never"}


def _mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return model, torch.randn(10, 3, dtype=torch.float64), torch.arange(10) % 2


def _ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize(
    ("make", "wd", "threshold"),
    [
        (lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.5), 0.5, 3800.0),
        (lambda ps: torch.optim.Adagrad(ps, lr=0.05, initial_accumulator_value=0.1), 0.0, 40.0),
        (lambda ps: torch.optim.Adagrad(ps, lr=0.05, weight_decay=0.3), 0.3, 40.0),
    ],
    ids=["Adam-L2", "Adagrad", "Adagrad-L2"],
)
def test_lambda1_precond_against_dense(tmp_path: Path, make, wd: float, threshold: float) -> None:
    model, x, y = _mlp()
    opt = make(model.parameters())
    rec = tmp_path / "r.stiff"
    agent = offline_agent(model, nn.CrossEntropyLoss(), opt, rec, probe=(x, y), **SETTINGS)
    for _ in range(12):  # past Adam's momentum warm-up (10 steps)
        train_step(agent, opt, _ce(model, x, y))
    msgs = close_and_read(agent, rec)
    p, why = diagonal_preconditioner(opt, list(model.parameters()))
    assert p is not None, why
    h = dense_hessian_of(model, x, lambda out: nn.functional.cross_entropy(out, y))
    s = p.rsqrt()
    want = float(torch.linalg.eigvalsh(s[:, None] * (h + wd * torch.eye(len(p))) * s[None, :])[-1])
    got = last_scalar(msgs, "sharpness/lambda1_precond")
    print(f"λ1(P⁻¹(H+wd)) ours {got:.10g} vs dense {want:.10g}, rel {abs(got - want) / want:.1e}")
    assert got == pytest.approx(want, rel=1e-6)
    assert last_scalar(msgs, "sharpness/threshold_precond") == pytest.approx(threshold, rel=1e-12)


def test_lbfgs_closure_steps_with_the_agent(tmp_path: Path) -> None:
    model, x, y = _mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    rec = tmp_path / "lbfgs.stiff"
    agent = offline_agent(model, nn.CrossEntropyLoss(), opt, rec, probe=(x, y), **SETTINGS)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _ce(model, x, y)
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
        agent.step(loss)
    msgs = close_and_read(agent, rec)
    assert not metric_errors(msgs)
    h = dense_hessian_of(model, x, lambda out: nn.functional.cross_entropy(out, y))
    want = float(torch.linalg.eigvalsh(h)[-1])
    assert last_scalar(msgs, "sharpness/lambda1_h") == pytest.approx(want, rel=1e-6)
    assert math.isnan(last_scalar(msgs, "sharpness/threshold"))
    assert any("quasi-Newton" in e.message for e in events(msgs, "threshold-none"))


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): θ ← θ − η sign(β1 m + (1 − β1) g), m ← β2 m + (1 − β2) g."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99)):
        super().__init__(params, {"lr": lr, "betas": betas})

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for q in g["params"]:
                if q.grad is None:
                    continue
                m = self.state[q].setdefault("exp_avg", torch.zeros_like(q))
                q.add_(torch.sign(b1 * m + (1 - b1) * q.grad), alpha=-g["lr"])
                m.mul_(b2).add_(q.grad, alpha=1 - b2)


class SAM(torch.optim.Optimizer):
    """SAM (Foret et al. 2021) around a base optimizer: first_step / second_step."""

    def __init__(self, params, base=torch.optim.SGD, rho: float = 0.05, **kw):
        super().__init__(params, {"rho": rho, **kw})
        self.base_optimizer = base(self.param_groups, **kw)

    @torch.no_grad()
    def first_step(self):
        for g in self.param_groups:
            norm = torch.sqrt(sum((q.grad**2).sum() for q in g["params"] if q.grad is not None))
            for q in g["params"]:
                if q.grad is not None:
                    e = q.grad * g["rho"] / (norm + 1e-12)
                    q.add_(e)
                    self.state[q]["e"] = e

    @torch.no_grad()
    def second_step(self):
        for g in self.param_groups:
            for q in g["params"]:
                if "e" in self.state[q]:
                    q.sub_(self.state[q]["e"])
        self.base_optimizer.step()

    def step(self, closure=None):
        raise RuntimeError("use first_step / second_step")


class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al. 2019): slow weights pulled towards the fast ones every k."""

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        self.optimizer, self.k, self.alpha = optimizer, k, alpha
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults

    def step(self, closure=None):
        return self.optimizer.step(closure)


def test_no_bound_optimizers_say_why() -> None:
    x = nn.Parameter(torch.zeros(1))
    cases = {
        "Rprop": (torch.optim.Rprop([x]), "sign-based"),
        "LBFGS": (torch.optim.LBFGS([x]), "quasi-Newton"),
        "Lion": (Lion([x]), "sign-based"),
        "SAM": (SAM([x], lr=0.1), "SAM-like"),
        "Lookahead": (Lookahead(torch.optim.SGD([x], lr=0.1)), "slow weights"),
    }
    for name, (opt, words) in cases.items():
        thr = stability_threshold_for(opt)
        assert thr.value is None and words in thr.rule, (name, thr.rule)


@pytest.mark.parametrize("which", ["Rprop", "Lion", "LBFGS"])
def test_no_bound_optimizers_do_not_diverge_on_a_sharp_quadratic(which: str) -> None:
    """On ½ λ x² at λ = 10⁶ (2/η = 200 for η = 0.01) they stay bounded: no curvature bound."""
    lam = 1e6
    x = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    make = {
        "Rprop": lambda: torch.optim.Rprop([x], lr=0.01),
        "Lion": lambda: Lion([x], lr=0.01),
        "LBFGS": lambda: torch.optim.LBFGS([x], lr=1.0),
    }
    opt = make[which]()
    top = 0.0
    for _ in range(200):

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = 0.5 * lam * (x**2).sum()
            loss.backward()
            return loss

        opt.step(closure) if which == "LBFGS" else (closure(), opt.step())
        top = max(top, float(x.detach().abs()))
    assert top <= 1.0 + 0.01 * 50 + TINY  # never above x0 + a few of its steps


def test_thresholds_follow_the_lr_each_step_used(tmp_path: Path) -> None:
    """4 micro-batches per step with a scheduler stepped per micro-batch (so after each
    optimizer step the group's lr is 4 scheduler steps further), then lr set by hand, then
    ReduceLROnPlateau: each measured threshold is 2/η of the lr that step used."""
    model, x, y = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + 0.1 * i))
    rec = tmp_path / "acc.stiff"
    agent = offline_agent(model, nn.CrossEntropyLoss(), opt, rec, probe=(x, y), **SETTINGS)
    used = []
    for step in range(6):
        if step == 3:
            opt.param_groups[0]["lr"] = 0.07  # by hand
        for mb in range(4):
            loss = _ce(model, x[mb::4], y[mb::4]) / 4
            loss.backward()
            if mb == 3:
                used.append(opt.param_groups[0]["lr"])
                opt.step()
                opt.zero_grad()
            if step < 3:
                sched.step()
        agent.step(loss)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    for _ in range(3):
        train_step(agent, opt, _ce(model, x, y))
        used.append(opt.param_groups[0]["lr"])
        plateau.step(1.0)  # no improvement: halves the lr for the next step
    msgs = close_and_read(agent, rec)
    got = scalar_values(msgs, "sharpness/threshold")
    assert len(got) == len(used)
    for g, lr in zip(got, used, strict=True):
        assert g == pytest.approx(2 / lr, rel=1e-12), (got, used)
