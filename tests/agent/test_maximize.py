"""An optimizer with ``maximize=True`` ascends the loss f, i.e. descends −f.

Its stability threshold (2/η for SGD) bounds the top eigenvalue of −H_f = −λ_min(H_f), not
λ_max(H_f). Before, the agent measured f: on gradient ascent of −CE the shown λ1_H was 2–7×
too low and fell while the real one rose. The references are float64 dense Hessians of the
objective the optimizer descends, and a per-example loop for the noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from stiffmon_agent.metrics.thresholds import (
    maximizes,
    preconditioned_threshold_for,
    stability_threshold_for,
)
from tests.agent.metrics.reference import dense_hessian_of
from tests.agent.recording import EXACT, close_and_read, events, last_scalar, offline_agent


def _setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(18, 5, generator=g, dtype=torch.float64)
    return model, x, torch.randint(0, 3, (18,), generator=g)


def _neg_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -nn.functional.cross_entropy(out, y, reduction="none")


def _record(tmp_path: Path, opt_of: Any, loss_fn: Any = _neg_ce) -> list[Any]:
    model, x, y = _setup()
    opt = opt_of(model)
    rec = tmp_path / "m.stiff"
    agent = offline_agent(model, loss_fn, opt, rec, probe=(x, y), **EXACT)
    agent.step(loss_fn(model(x), y).mean())  # no optimizer step: the refs' weights
    return close_and_read(agent, rec)


def _sgd_ascent(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, maximize=True)


def test_ascent_measures_the_objective_descended(tmp_path: Path) -> None:
    model, x, y = _setup()
    msgs = _record(tmp_path, _sgd_ascent)
    h = dense_hessian_of(model, x, lambda out: _neg_ce(out, y).mean())  # Hessian of f
    eig = torch.linalg.eigvalsh(h)
    assert float(-eig[0]) > 1.5 * float(eig[-1])  # what was measured before is told apart
    assert last_scalar(msgs, "sharpness/lambda1_h") == pytest.approx(float(-eig[0]), rel=1e-6)
    assert last_scalar(msgs, "sharpness/threshold") == pytest.approx(20.0)
    # the noise does not depend on the sign: Tr K of the per-example gradients of f
    grads = []
    for i in range(len(y)):
        li = _neg_ce(model(x[i : i + 1]), y[i : i + 1])[0]
        grads.append(
            torch.cat([t.reshape(-1) for t in torch.autograd.grad(li, model.parameters())])
        )
    g = torch.stack(grads)
    trace_k = float(((g - g.mean(0)) ** 2).sum(1).mean())
    assert last_scalar(msgs, "noise/trace_k") == pytest.approx(trace_k, rel=1e-9)
    (said,) = events(msgs, "maximize")
    assert "−loss" in said.message and said.level == "info"


def test_plain_descent_says_nothing(tmp_path: Path) -> None:
    msgs = _record(tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    assert not events(msgs, "maximize")


def test_adam_ascent_preconditions_the_descended_hessian(tmp_path: Path) -> None:
    """λ1(P⁻¹H) of −f for Adam(maximize=True): P is the same (squared gradients)."""
    model, x, y = _setup()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, maximize=True)
    for _ in range(12):  # past Adam's momentum warm-up (t ≈ 1/(1 − β1)), when P counts
        opt.zero_grad()
        loss = _neg_ce(model(x), y).mean()
        loss.backward()
        opt.step()  # the reference is taken at the weights after these steps
    state = [opt.state[q] for q in model.parameters()]
    v = torch.cat([s["exp_avg_sq"].reshape(-1) for s in state])
    t = float(state[0]["step"])
    b1, b2 = opt.param_groups[0]["betas"]
    diag = (1 - b1**t) * ((v / (1 - b2**t)).sqrt() + opt.param_groups[0]["eps"])
    h = dense_hessian_of(model, x, lambda out: -_neg_ce(out, y).mean())  # of −f
    s = diag.rsqrt()
    ref = float(torch.linalg.eigvalsh(s[:, None] * h * s[None, :])[-1])
    rec = tmp_path / "a.stiff"
    agent = offline_agent(
        model, _neg_ce, opt, rec, probe=(x, y), **(EXACT | {"gram_every": "never"})
    )
    agent.step(loss)
    msgs = close_and_read(agent, rec)
    assert last_scalar(msgs, "sharpness/lambda1_precond") == pytest.approx(ref, rel=1e-6)


def test_groups_that_differ_in_maximize_have_no_threshold() -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    mixed = torch.optim.SGD(
        [{"params": a.parameters()}, {"params": b.parameters(), "maximize": True}], lr=0.1
    )
    assert maximizes(mixed) is None
    t = stability_threshold_for(mixed)
    assert t.value is None and "maximize" in t.rule
    assert maximizes(torch.optim.SGD(a.parameters(), lr=0.1)) is False
    assert maximizes(torch.optim.Adam(a.parameters(), maximize=True)) is True
    assert maximizes(None) is False
    adam = torch.optim.Adam(
        [{"params": a.parameters()}, {"params": b.parameters(), "maximize": True}]
    )
    t = preconditioned_threshold_for(adam)
    assert t.value is None and "maximize" in t.rule
