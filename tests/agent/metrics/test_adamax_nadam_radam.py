"""λ1(P⁻¹H) and its bound for Adamax, NAdam and RAdam, against torch's own optimizers.

Bounds: torch's optimizer steps on f(x) = ½ λ x² in float64 with P held at 1 (ε = 1, x tiny, so
v ≪ ε² and Adamax's u = |g| + ε ≈ 1): λ1(P⁻¹H) = λ once 1 − β1^t, RAdam's r_t and NAdam's Π_t
have settled, and the bound is right iff the optimizer converges at 0.99 × it and diverges at
1.01 × it. NAdam's μ_t = β1(1 − ½·0.96^(tψ)) is constant β1/2 at ψ = 0 and → β1 at ψ = 1.

P: the update torch takes is θ ← θ − η·(momentum term)/P, so P is read off a real step
(P = −η·term/Δθ) and compared with :func:`diagonal_preconditioner` (RAdam mid-rectification
included); and the agent's λ1(P⁻¹H) against the dense P^{-1/2} H P^{-1/2} with P from the
optimizer's state by torch's formulas.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from stiffmon_agent.metrics import (
    diagonal_preconditioner,
    momentum_warmup,
    preconditioned_threshold_for,
    stability_threshold_for,
)
from stiffmon_agent.metrics.thresholds import nadam_coefficients
from tests.agent.metrics.reference import dense_hessian_of, quadratic_growth
from tests.agent.recording import (
    EVERY_STEP,
    EXACT,
    close_and_read,
    last_scalar,
    offline_agent,
    train_step,
)

X0 = 1e-20


def _settle(opt: torch.optim.Optimizer, x: nn.Parameter, steps: int = 1000) -> None:
    """Zero-gradient steps: x stays X0, the step count (1 − β1^t, r_t, μ_t, Π_t) moves on."""
    for _ in range(steps):
        x.grad = torch.zeros_like(x)
        opt.step()


CASES: dict[str, tuple[Any, float]] = {
    "Adamax": (lambda x: torch.optim.Adamax([x], lr=0.01, eps=1.0), 3800.0),
    "RAdam": (lambda x: torch.optim.RAdam([x], lr=0.01, eps=1.0, betas=(0.9, 0.9)), 3800.0),
    "RAdam-decoupled": (
        lambda x: torch.optim.RAdam(
            [x], lr=0.01, eps=1.0, betas=(0.9, 0.9), weight_decay=5.0, decoupled_weight_decay=True
        ),
        3800.0 * (1 - 0.01 * 5.0 / 2),
    ),
    "NAdam-mu-0.45": (  # ψ = 0: μ = β1/2 always
        lambda x: torch.optim.NAdam([x], lr=0.01, eps=1.0, momentum_decay=0.0),
        3.8 / (0.01 * (1.9 * 0.55 + 0.1 * 0.45)),
    ),
    "NAdam-mu-0.9": (  # ψ = 1: μ → β1, (2+2β1)/((1-β1)(1+2β1)η)
        lambda x: torch.optim.NAdam([x], lr=0.01, eps=1.0, momentum_decay=1.0),
        3.8 / (0.01 * 0.1 * 2.8),
    ),
    "NAdam-decoupled": (
        lambda x: torch.optim.NAdam(
            [x], lr=0.01, eps=1.0, momentum_decay=1.0, weight_decay=5.0, decoupled_weight_decay=True
        ),
        3.8 / (0.01 * 0.1 * 2.8) * (1 - 0.01 * 5.0 / 2),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_bound_is_where_torchs_optimizer_diverges(case: str) -> None:
    make, closed_form = CASES[case]
    x = nn.Parameter(torch.tensor([X0], dtype=torch.float64))
    opt = make(x)
    _settle(opt, x)
    bound = preconditioned_threshold_for(opt)
    assert bound.value == pytest.approx(closed_form, rel=1e-6), bound.rule
    assert "λ1(P⁻¹H)" in stability_threshold_for(opt).rule
    diag, why = diagonal_preconditioner(opt, [x])
    assert diag is not None, why
    assert float(diag[0]) == pytest.approx(1.0, rel=1e-9)  # P⁻¹H = λ
    assert momentum_warmup(opt) == ""
    for factor, stable in ((0.99, True), (1.01, False)):
        x = nn.Parameter(torch.tensor([X0], dtype=torch.float64))
        opt = make(x)
        _settle(opt, x)
        final = quadratic_growth(opt, x, factor * bound.value)
        assert (final < 1e-2) == stable, (factor, final)
        assert (final > 1e2) == (not stable), (factor, final)


def _momentum_term(opt: torch.optim.Optimizer, g: torch.Tensor, st: dict[str, Any]) -> Any:
    """The numerator torch divides by P·/η in its step (state ``st`` after that step)."""
    group = opt.param_groups[0]
    if isinstance(opt, torch.optim.NAdam):
        c1, c2 = nadam_coefficients(opt, group)
        return c1 * g + c2 * st["exp_avg"]
    return st["exp_avg"]


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.Adamax(ps, lr=0.01),
        lambda ps: torch.optim.RAdam(ps, lr=0.01),  # t = 20..21: r_t ≈ 0.1, 1 − β2^t ≈ 0.02
        lambda ps: torch.optim.RAdam(ps, lr=0.01, betas=(0.9, 0.5)),  # never rectified: SGD
        lambda ps: torch.optim.NAdam(ps, lr=0.01),
    ],
    ids=["Adamax", "RAdam", "RAdam-unrectified", "NAdam"],
)
def test_p_is_the_divisor_of_torchs_step(make) -> None:
    torch.manual_seed(0)
    x = nn.Parameter(torch.randn(6, dtype=torch.float64))
    opt = make([x])
    for _ in range(20):
        x.grad = torch.randn(6, dtype=torch.float64)
        opt.step()
    g = torch.randn(6, dtype=torch.float64)
    before = x.detach().clone()
    x.grad = g
    opt.step()
    term = _momentum_term(opt, g, opt.state[x])
    p_torch = -0.01 * term / (x.detach() - before)
    diag, why = diagonal_preconditioner(opt, [x])
    assert diag is not None, why
    torch.testing.assert_close(diag, p_torch, rtol=1e-9, atol=0)


def _p_from_state(opt: torch.optim.Optimizer, p: nn.Parameter) -> torch.Tensor:
    """P by torch's formulas from the state of ``p`` (independent of the agent's code)."""
    st, g = opt.state[p], opt.param_groups[0]
    (b1, b2), eps, t = g["betas"], g["eps"], float(st["step"])
    if isinstance(opt, torch.optim.Adamax):
        d = (1 - b1**t) * st["exp_inf"]
    elif isinstance(opt, torch.optim.NAdam):
        d = (st["exp_avg_sq"] / (1 - b2**t)).sqrt() + eps
    else:  # RAdam, rectified at t = 12
        rho_inf = 2 / (1 - b2) - 1
        rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
        r = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
        d = (1 - b1**t) * (st["exp_avg_sq"].sqrt() + eps) / (r * math.sqrt(1 - b2**t))
    return d.detach().reshape(-1)


@pytest.mark.parametrize("kind", ["Adamax", "NAdam", "RAdam"])
def test_the_agent_publishes_lambda1_precond_and_its_bound(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.arange(10) % 2
    opt = getattr(torch.optim, kind)(model.parameters(), lr=0.01)
    rec = tmp_path / "run.stiff"
    settings = EXACT | EVERY_STEP | {"gram_every": "never"}
    agent = offline_agent(model, nn.CrossEntropyLoss(), opt, rec, probe=(x, y), **settings)
    for _ in range(12):  # past the momentum warm-up (1/(1-β1) = 10 steps)
        train_step(agent, opt, nn.functional.cross_entropy(model(x), y))
    msgs = close_and_read(agent, rec)
    p = torch.cat([_p_from_state(opt, q) for q in model.parameters()])
    h = dense_hessian_of(model, x, lambda out: nn.functional.cross_entropy(out, y))
    s = p.rsqrt()
    want = float(torch.linalg.eigvalsh(s[:, None] * h * s[None, :])[-1])
    assert last_scalar(msgs, "sharpness/lambda1_precond") == pytest.approx(want, rel=1e-6)
    bound = preconditioned_threshold_for(copy.deepcopy(opt)).value
    assert bound is not None and math.isfinite(bound)
    assert last_scalar(msgs, "sharpness/threshold_precond") == pytest.approx(bound, rel=1e-12)
    if kind != "NAdam":
        assert bound == pytest.approx(3800.0, rel=1e-12)


def test_radam_waits_for_its_rectification() -> None:
    x = nn.Parameter(torch.zeros(1))
    opt = torch.optim.RAdam([x], lr=0.01, betas=(0.5, 0.999))  # momentum settles after 2
    _settle(opt, x, 3)
    assert "rectification starts at step 6" in momentum_warmup(opt)
    _settle(opt, x, 3)
    assert momentum_warmup(opt) == ""
