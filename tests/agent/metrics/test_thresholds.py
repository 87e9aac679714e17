"""Stability thresholds against the optimizers themselves on 1-D quadratics at 0.99× / 1.01×.

The reference is torch's own optimizer stepping on f(x) = ½ λ x² (per parameter): the threshold
is right iff it converges at 0.99 × the threshold and diverges at 1.01 ×.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from stiffmon_agent.metrics import (
    diagonal_preconditioner,
    hessian_eigen,
    preconditioned_threshold_for,
    stability_threshold,
    stability_threshold_for,
)

STEPS = 500


def _run(
    make_opt: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
    curv: list[float],
    groups: list[dict[str, Any]],
    x0: float = 1.0,
) -> tuple[float, torch.optim.Optimizer]:
    """Step the optimizer on Σ_g ½ λ_g x_g² (one scalar parameter per group); final max |x|."""
    xs = [nn.Parameter(torch.tensor([x0], dtype=torch.float64)) for _ in groups]
    opt = make_opt([{**g, "params": [x]} for g, x in zip(groups, xs, strict=True)])
    for _ in range(STEPS):
        opt.zero_grad()
        loss = sum(0.5 * c * (x**2).sum() for c, x in zip(curv, xs, strict=True))
        loss.backward()  # type: ignore[union-attr]
        opt.step()
    return max(float(x.detach().abs().max()) for x in xs), opt


SGD_CASES = {
    "plain": [{"lr": 0.1}],
    "momentum": [{"lr": 0.05, "momentum": 0.9}],
    "nesterov": [{"lr": 0.05, "momentum": 0.5, "nesterov": True}],
    "dampening": [{"lr": 0.05, "momentum": 0.9, "dampening": 0.3}],
    "weight-decay": [{"lr": 0.1, "weight_decay": 0.5}],
    "momentum-weight-decay": [{"lr": 0.05, "momentum": 0.9, "weight_decay": 2.0}],
    "groups": [{"lr": 0.01}, {"lr": 0.1}],
    "groups-wd": [{"lr": 0.1}, {"lr": 0.08, "weight_decay": 3.0}, {"lr": 0.01}],
}


@pytest.mark.parametrize("name", sorted(SGD_CASES))
def test_sgd_threshold_on_quadratics(name: str) -> None:
    groups = SGD_CASES[name]
    probe = torch.optim.SGD([{**g, "params": [nn.Parameter(torch.zeros(1))]} for g in groups])
    thr = stability_threshold_for(probe)
    assert thr.value is not None and thr.group is not None
    assert f"group {thr.group}" in thr.rule and "SGD" in thr.rule
    # the same curvature λ in every group: the most restrictive group decides
    for factor, stable in ((0.99, True), (1.01, False)):
        lam = factor * thr.value
        final, _ = _run(lambda g: torch.optim.SGD(g), [lam] * len(groups), groups)
        assert (final < 1e-3) == stable, (name, factor, final)
        assert (final > 1e3) == (not stable), (name, factor, final)


def test_threshold_follows_the_learning_rate_schedule() -> None:
    x = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([x], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    assert stability_threshold_for(opt).value == pytest.approx(20.0)
    opt.step()
    sched.step()
    assert stability_threshold_for(opt).value == pytest.approx(40.0)


def test_threshold_rules_named() -> None:
    assert stability_threshold(0.1).value == pytest.approx(20.0)
    assert stability_threshold(0.1, weight_decay=1.0).rule == "2/η - wd"
    assert stability_threshold(0.1, weight_decay=1.0).value == pytest.approx(19.0)
    opt = torch.optim.SGD(
        [
            {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.01},
            {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.1, "weight_decay": 0.5},
        ]
    )
    thr = stability_threshold_for(opt)
    assert thr.value == pytest.approx(19.5) and thr.group == 1
    assert thr.rule == "2/η - wd (SGD, group 1)"
    assert stability_threshold_for(opt, group=0).value == pytest.approx(200.0)
    adam = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=0.01)  # weight_decay 0.01
    assert stability_threshold_for(adam).value is None
    pre = preconditioned_threshold_for(adam)
    assert pre.value == pytest.approx(38.0 / 0.01 * (1 - 0.01 * 0.01 / 2), rel=1e-12)
    assert pre.preconditioned
    assert "(2+2β1)/((1-β1)η)" in pre.rule and "AdamW" in pre.rule
    lbfgs = torch.optim.LBFGS([nn.Parameter(torch.zeros(1))])
    assert stability_threshold_for(lbfgs).value is None
    assert preconditioned_threshold_for(lbfgs).value is None
    rprop = torch.optim.Rprop([nn.Parameter(torch.zeros(1))])  # sign-based: no bound at all
    assert "λ1(P⁻¹H)" not in stability_threshold_for(rprop).rule
    assert "λ1(P⁻¹H)" in stability_threshold_for(adam).rule


def _quadratic_model(lam: float) -> tuple[nn.Module, torch.Tensor, torch.Tensor, Any]:
    """A 1-parameter model whose probe loss is ½ λ x² exactly (MSE of x·√λ against 0)."""
    model = nn.Linear(1, 1, bias=False).double()
    inputs = torch.ones(1, 1, dtype=torch.float64) * lam**0.5
    targets = torch.zeros(1, 1, dtype=torch.float64)

    def half_mse(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((out - t) ** 2).reshape(-1)

    return model, inputs, targets, half_mse


@pytest.mark.parametrize(
    "kind, groups",
    [
        ("Adam", [{"lr": 0.01, "eps": 1.0}]),
        ("AdamW", [{"lr": 0.01, "eps": 1.0, "betas": (0.8, 0.99), "weight_decay": 0.0}]),
        ("Adam", [{"lr": 0.02, "eps": 1.0}, {"lr": 0.01, "eps": 1.0}]),
        ("RMSprop", [{"lr": 0.01, "eps": 1.0}]),
        ("RMSprop", [{"lr": 0.01, "eps": 1.0, "momentum": 0.7}]),
    ],
)
def test_preconditioned_threshold_on_quadratics(kind: str, groups: list[dict[str, Any]]) -> None:
    """λ1(P⁻¹H) read from the optimizer's state at 0.99× / 1.01× of its threshold.

    With ε ≫ √v (tiny gradients) P stays ≈ constant, the regime of the Cohen et al. bound: the
    optimizer is then (EMA / heavy-ball) momentum on P⁻¹H.
    """
    cls = getattr(torch.optim, kind)
    probe = cls([{**g, "params": [nn.Parameter(torch.zeros(1))]} for g in groups])
    thr = preconditioned_threshold_for(probe)
    assert thr.value is not None
    for factor, stable in ((0.99, True), (1.01, False)):
        # warm up, then read P from the optimizer state and choose λ so that
        # λ1(P⁻¹H) = factor × threshold, measured through hessian_eigen(preconditioner=P)
        xs = [nn.Parameter(torch.tensor([1e-20], dtype=torch.float64)) for _ in groups]
        opt = cls([{**g, "params": [x]} for g, x in zip(groups, xs, strict=True)])
        for _ in range(300):  # zero gradients: v stays 0, Adam's bias correction 1 − β1^t → 1
            for x in xs:
                x.grad = torch.zeros_like(x)
            opt.step()
        diag, why = diagonal_preconditioner(opt, xs)
        assert diag is not None, why
        lam = [factor * thr.value * float(d) for d in diag]  # ~ε: P barely moves later
        model, inputs, targets, loss = _quadratic_model(lam[thr.group or 0])
        d1 = torch.tensor([float(diag[thr.group or 0])], dtype=torch.float64)
        got = hessian_eigen(model, inputs, targets, loss, preconditioner=d1, tol=1e-10)
        assert float(got.eigenvalues[0]) == pytest.approx(factor * thr.value, rel=1e-9)
        for _ in range(STEPS):
            opt.zero_grad()
            sum(0.5 * c * (x**2).sum() for c, x in zip(lam, xs, strict=True)).backward()  # type: ignore[union-attr]
            opt.step()
        final = max(float(x.detach().abs().max()) for x in xs) / 1e-20
        assert (final < 1e-3) == stable, (kind, factor, final)
        assert (final > 1e3) == (not stable), (kind, factor, final)


def test_adam_preconditioned_sharpness_matches_dense_reference() -> None:
    """λ1(P⁻¹H) of a small network after a few Adam steps: P from a hand-written Adam."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (12,), generator=g)
    ce = nn.CrossEntropyLoss()
    b1, b2, eps, lr = 0.9, 0.95, 1e-8, 0.01
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(b1, b2), eps=eps)
    params = list(model.parameters())
    v = [torch.zeros_like(p) for p in params]
    t = 5
    for _ in range(t):
        opt.zero_grad()
        ce(model(x), y).backward()
        v = [b2 * vi + (1 - b2) * p.grad.detach() ** 2 for vi, p in zip(v, params, strict=True)]  # type: ignore[operator]
        opt.step()
    ref_p = torch.cat([((1 - b1**t) * ((vi / (1 - b2**t)).sqrt() + eps)).reshape(-1) for vi in v])
    diag, _ = diagonal_preconditioner(opt, params)
    assert diag is not None
    torch.testing.assert_close(diag, ref_p, rtol=1e-12, atol=0)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in params]

    def loss(vec: torch.Tensor) -> torch.Tensor:
        parts = vec.split([s.numel() for s in shapes])
        pd = {n: c.view(s) for n, c, s in zip(names, parts, shapes, strict=True)}
        return ce(torch.func.functional_call(model, pd, (x,)), y)

    h = torch.autograd.functional.hessian(loss, flat)
    ref = torch.linalg.eigvals(torch.diag(1 / ref_p) @ h).real.max()
    got = hessian_eigen(model, x, y, ce, preconditioner=diag, tol=1e-10, max_hvps=500)
    assert float(got.eigenvalues[0]) == pytest.approx(float(ref), rel=1e-7)


def test_no_preconditioner_before_the_first_step() -> None:
    p = nn.Parameter(torch.zeros(3))
    diag, why = diagonal_preconditioner(torch.optim.Adam([p]), [p])
    assert diag is None and "first step" in why
    diag, why = diagonal_preconditioner(torch.optim.SGD([p], lr=0.1), [p])
    assert diag is None and "SGD" in why


def test_a_group_frozen_by_lr_0_sets_no_bound() -> None:
    """A backbone frozen with lr = 0 beside a head at 0.1: the head's 2/η = 20, not NaN."""
    backbone, head = nn.Linear(3, 3), nn.Linear(3, 2)
    groups = [{"params": backbone.parameters(), "lr": 0.0}, {"params": head.parameters()}]
    sgd = torch.optim.SGD(groups, lr=0.1)
    t = stability_threshold_for(sgd)
    assert t.value == pytest.approx(20.0) and t.group == 1 and "group 1" in t.rule
    adam_groups = [{"params": backbone.parameters(), "lr": 0.0}, {"params": head.parameters()}]
    adam = torch.optim.Adam(adam_groups, lr=0.01, betas=(0.9, 0.999))
    p = preconditioned_threshold_for(adam)
    assert p.value == pytest.approx(3.8 / (0.1 * 0.01)) and p.group == 1 and p.preconditioned
    for g in sgd.param_groups:
        g["lr"] = 0.0  # a warmup from 0: nothing moves, no threshold, and it says why
    none = stability_threshold_for(sgd)
    assert none.value is None and "η = 0 in every group" in none.rule
    sgd.param_groups[1]["lr"] = -0.1  # not 0: an unknown bound still makes the whole unknown
    assert stability_threshold_for(sgd).value is None
