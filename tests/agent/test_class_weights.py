"""A class-weighted mean over one target per example trains on Σ w_{y_i} ℓ_i / Σ w_{y_i}.

Before, the agent measured (1/N) Σ w_{y_i} ℓ_i: λ1_H was w̄ times too large (7.0× on a
balanced probe with weights [1, 10, 10]) and Tr K w̄² times, with nothing said. Every figure is
checked against float64 references of the objective itself, not of the agent's rescaled loss.
It is the T = 1 case of :func:`~stiffmon_agent.probe_set.count_weighted` (per-element targets:
``test_token_weighting.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from stiffmon_agent.metrics import per_example_gram
from stiffmon_agent.probe_set import count_weighted
from tests.agent.metrics.reference import dense_hessian_of, rel_err
from tests.agent.recording import (
    EXACT,
    close_and_read,
    events,
    last_scalar,
    offline_agent,
    train_step,
)

WEIGHT = torch.tensor([1.0, 10.0, 4.0], dtype=torch.float64)


def _setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(18, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0] * 10 + [1] * 3 + [2] * 5)  # unbalanced: w̄ = (10 + 30 + 20) / 18
    return model, x, y


def _objective(y: torch.Tensor) -> Any:
    return lambda out: nn.functional.cross_entropy(out, y, weight=WEIGHT)  # Σ w ℓ / Σ w


def _record(tmp_path: Path, loss_fn: nn.Module) -> list[Any]:
    model, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay where the refs are
    rec = tmp_path / "w.stiff"
    agent = offline_agent(model, loss_fn, opt, rec, probe=(x, y), **EXACT)
    train_step(agent, opt, loss_fn(model(x), y))
    return close_and_read(agent, rec)


def test_the_weighted_objective_is_measured_and_said(tmp_path: Path) -> None:
    model, x, y = _setup()
    msgs = _record(tmp_path, nn.CrossEntropyLoss(weight=WEIGHT))
    lam = float(torch.linalg.eigvalsh(dense_hessian_of(model, x, _objective(y)))[-1])
    unnormalised = float(
        torch.linalg.eigvalsh(
            dense_hessian_of(
                model, x, lambda out: nn.functional.cross_entropy(out, y, weight=WEIGHT,
                                                                  reduction="none").mean()
            )
        )[-1]
    )  # fmt: skip
    assert unnormalised > 2 * lam  # what was measured before: the test tells them apart
    assert last_scalar(msgs, "sharpness/lambda1_h") == pytest.approx(lam, rel=1e-6)
    # the per-example contributions c_i with (1/N) Σ c_i = the objective's gradient on the probe
    wbar = float(WEIGHT[y].mean())
    grads = []
    for i in range(len(y)):
        out = model(x[i : i + 1])
        li = WEIGHT[y[i]] * nn.functional.cross_entropy(out, y[i : i + 1]) / wbar
        grads.append(
            torch.cat([t.reshape(-1) for t in torch.autograd.grad(li, model.parameters())])
        )
    g = torch.stack(grads)
    full = torch.autograd.grad(_objective(y)(model(x)), list(model.parameters()))
    assert rel_err(g.mean(0), torch.cat([t.reshape(-1) for t in full])) < 1e-12
    trace_k = float(((g - g.mean(0)) ** 2).sum(1).mean())
    assert last_scalar(msgs, "noise/trace_k") == pytest.approx(trace_k, rel=1e-9)
    said = events(msgs, "class-weighted")
    assert len(said) == 1 and f"w̄ = {wbar:.6g}" in said[0].message
    assert said[0].attrs["wbar"] == pytest.approx(wbar, rel=1e-12)
    assert not events(msgs, "token-weighted")


def test_other_losses_and_targets_are_left_as_they_are() -> None:
    y = torch.tensor([0, 1, 2])
    for loss in (
        nn.CrossEntropyLoss(),  # no weights
        nn.CrossEntropyLoss(weight=WEIGHT, reduction="sum"),  # Σ w ℓ: already the objective
        nn.MSELoss(),
    ):
        assert count_weighted(loss, y) == (loss, None)
    tokens = torch.zeros(3, 4, dtype=torch.long)  # per-element targets, each example's count
    weighted = nn.CrossEntropyLoss(weight=WEIGHT)  # alike: c̄ is each one's own (no change)
    assert count_weighted(weighted, tokens) == (weighted, None)
    soft = torch.rand(3, 3)  # probability targets: torch divides by N
    assert count_weighted(weighted, soft) == (weighted, None)


def test_ignored_targets_do_not_count_in_the_mean_weight_and_all_zero_weights_are_refused() -> None:
    loss = nn.CrossEntropyLoss(weight=WEIGHT, ignore_index=-1)
    _, info = count_weighted(loss, torch.tensor([1, 1, -1, 2]))
    assert info is not None and info.mean == pytest.approx(8.0)
    with pytest.raises(ValueError, match="all 0"):
        count_weighted(nn.CrossEntropyLoss(weight=torch.tensor([0.0, 1.0])), torch.tensor([0, 0]))


def test_the_gram_of_the_measured_loss_is_that_of_the_objective_contributions() -> None:
    model, x, y = _setup()
    measured, info = count_weighted(nn.CrossEntropyLoss(weight=WEIGHT), y)
    assert info is not None and info.mean == pytest.approx(60 / 18)
    got = per_example_gram(model, x, y, measured, chunk_size=7).total
    rows = []
    for i in range(len(y)):
        out = model(x[i : i + 1])
        li = WEIGHT[y[i]] * nn.functional.cross_entropy(out, y[i : i + 1]) * (18 / 60)
        rows.append(torch.cat([t.reshape(-1) for t in torch.autograd.grad(li, model.parameters())]))
    g = torch.stack(rows)
    assert rel_err(got, g @ g.T) < 1e-10
