"""Regression objectives measured by the agent against float64 brute force.

* A heteroscedastic model (mean and variance heads) trained on ``GaussianNLLLoss``: λ1_H (dense
  Hessian), Tr K and λ1_K (single-example loop), the input stiffness-vs-distance curve (my own
  pair loop), and an info event saying why there is no class stiffness.
* A sample-weighted MSE, Σ w_i l_i / Σ w_i: with the weights in the probe targets divided by
  their probe mean (the README's recipe) every number is that objective's; with raw weights
  λ1_H is w̄ times too large and Tr K w̄² times.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon import protocol as p
from tests.agent.metrics.reference import dense_hessian_of
from tests.agent.recording import (
    EXACT,
    close_and_read,
    events,
    last_scalar,
    offline_agent,
    train_step,
)

N, DIN, K = 24, 4, 2


class Hetero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(DIN, 10)
        self.mu = nn.Linear(10, K)
        self.var = nn.Linear(10, K)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.tanh(self.body(x))
        return self.mu(h), F.softplus(self.var(h)) + 1e-3


def _loop_grads(model: nn.Module, x: Tensor, loss_i: Any) -> Tensor:
    m = copy.deepcopy(model).eval()
    params = [q for q in m.parameters() if q.requires_grad]
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_i(m(x[i : i + 1]), i), params)])
        for i in range(N)
    ]
    return torch.stack(rows)


def _trace_k_lambda1_k(g: Tensor) -> tuple[float, float]:
    c = g - g.mean(0)
    cov_gram = c @ c.T / N  # non-zero spectrum of K = cᵀc / N
    return float(cov_gram.trace()), float(torch.linalg.eigvalsh(cov_gram)[-1])


def _run(model: nn.Module, loss_fn: Any, x: Tensor, y: Any, train: Any, tmp: Path) -> list[Any]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = offline_agent(
        model, loss_fn, opt, tmp / "r.stiff", probe=(x, y), density_every="never", **EXACT
    )
    for _ in range(2):
        train_step(agent, opt, train(model))
    return close_and_read(agent, tmp / "r.stiff")


def test_heteroscedastic_gaussian_nll_matches_float64(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Hetero().double()
    x, y = torch.randn(N, DIN, dtype=torch.float64), torch.randn(N, K, dtype=torch.float64)

    def loss_fn(out: tuple[Tensor, Tensor], t: Tensor) -> Tensor:
        return F.gaussian_nll_loss(out[0], t, out[1], reduction="none")

    def train(m: nn.Module) -> Tensor:
        mean, var = m(x)
        return F.gaussian_nll_loss(mean, y, var)

    msgs = _run(model, loss_fn, x, y, train, tmp_path)

    def nll(out: tuple[Tensor, Tensor], t: Tensor) -> Tensor:  # per element, full=False
        return 0.5 * (out[1].log() + (t - out[0]) ** 2 / out[1])

    g = _loop_grads(model, x, lambda out, i: nll(out, y[i : i + 1]).mean())
    tr, l1k = _trace_k_lambda1_k(g)
    h = dense_hessian_of(model.eval(), x, lambda out: nll(out, y).mean())
    lam = float(torch.linalg.eigvalsh(h)[-1])
    assert abs(last_scalar(msgs, "sharpness/lambda1_h") - lam) / lam < 1e-8
    assert abs(last_scalar(msgs, "noise/trace_k") - tr) / tr < 1e-10
    assert abs(last_scalar(msgs, "noise/lambda1_k") - l1k) / l1k < 1e-10
    assert events(msgs, "no-class-labels")  # says why there is no class stiffness
    assert not any(isinstance(m, p.Matrix) for m in msgs)
    # stiffness against input distance: my own binning of every pair i < j
    u = x / x.norm(dim=1, keepdim=True)
    cos = (g @ g.T) / (g.norm(dim=1)[:, None] * g.norm(dim=1)[None, :])
    sums, counts = [0.0] * 20, [0] * 20
    for i in range(N):
        for j in range(i + 1, N):
            b = min(int(float((u[i] - u[j]).norm()) / 0.1), 19)
            sums[b] += float(cos[i, j])
            counts[b] += 1
    curve = [m for m in msgs if isinstance(m, p.Curve) and m.name == "stiffness-distance/input"]
    got = [float(v) for v in curve[-1].y]
    for b in range(20):
        if counts[b]:
            assert abs(got[b] - sums[b] / counts[b]) < 1e-10
        else:
            assert math.isnan(got[b])


def test_sample_weighted_mse_recipe(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(DIN, 8), nn.Tanh(), nn.Linear(8, K)).double()
    x, y = torch.randn(N, DIN, dtype=torch.float64), torch.randn(N, K, dtype=torch.float64)
    w = torch.rand(N, dtype=torch.float64) * 3 + 0.1  # w̄ ≈ 1.6

    def weighted(out: Tensor, t: tuple[Tensor, Tensor]) -> Tensor:
        return ((out - t[0]) ** 2).mean(1) * t[1]

    def train(m: nn.Module) -> Tensor:
        return (w * ((m(x) - y) ** 2).mean(1)).sum() / w.sum()

    def obj(out: Tensor) -> Tensor:
        return (w * ((out - y) ** 2).mean(1)).sum() / w.sum()

    wbar = float(w.mean())
    got: dict[str, list[Any]] = {}
    for name, ws in (("recipe", w / w.mean()), ("raw", w)):
        (tmp_path / name).mkdir()
        got[name] = _run(copy.deepcopy(model), weighted, x, (y, ws), train, tmp_path / name)
    trained = copy.deepcopy(model)  # the same two steps, for the reference weights
    opt = torch.optim.SGD(trained.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        train(trained).backward()
        opt.step()
    lam = float(torch.linalg.eigvalsh(dense_hessian_of(trained.eval(), x, obj))[-1])
    g = _loop_grads(trained, x, lambda out, i: w[i] * ((out - y[i]) ** 2).mean() / wbar)
    tr, _ = _trace_k_lambda1_k(g)
    rec, raw = got["recipe"], got["raw"]
    assert abs(last_scalar(rec, "sharpness/lambda1_h") - lam) / lam < 1e-8
    assert abs(last_scalar(rec, "noise/trace_k") - tr) / tr < 1e-10
    # raw weights measure mean_i w_i l_i: w̄ × the objective's Hessian, w̄² × its Tr K
    assert abs(last_scalar(raw, "sharpness/lambda1_h") / lam - wbar) < 1e-6
    assert abs(last_scalar(raw, "noise/trace_k") / tr - wbar**2) < 1e-8
