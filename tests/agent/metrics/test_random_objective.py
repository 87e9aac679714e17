"""A probe objective that draws random numbers in eval mode (a DDPM's t and ε in ``forward=``):
every Hessian-vector product of a measurement sees one draw per chunk, so λ1_H is that of a
fixed objective and equals a float64 dense Hessian of it (:mod:`stiffmon_agent.metrics.pinned_rng`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from stiffmon_agent.metrics import HessianOperator, hessian_eigen
from stiffmon_agent.metrics.pinned_rng import PIN_SEED
from tests.agent.metrics.reference import dense_hessian_of
from tests.agent.recording import (
    EXACT,
    close_and_read,
    events,
    last_scalar,
    offline_agent,
    train_step,
)

T = 50
N = 12
CHUNK = 5


class Eps(nn.Module):
    """ε̂(x_t, t): an MLP on the noisy point and the scaled timestep."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Linear(12, 2))

    def forward(self, xt: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([xt, (t.to(xt) / T)[:, None]], 1))


def _alpha_bar() -> Tensor:
    return torch.cumprod(1 - torch.linspace(1e-3, 0.2, T, dtype=torch.float64), 0)


def _noisy(x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    ab = _alpha_bar()[t][:, None]
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def _draw(n: int, like: Tensor) -> tuple[Tensor, Tensor]:
    return torch.randint(0, T, (n,)), torch.randn_like(like)


def random_forward(model: nn.Module, x0: Tensor) -> tuple[Tensor, Tensor]:
    """DDPM forward as written from the README: t and ε drawn anew at each call."""
    t, eps = _draw(x0.shape[0], x0)
    return model(_noisy(x0, t, eps), t), eps


def loss_fn(out: tuple[Tensor, Tensor], _y: Tensor) -> Tensor:
    """Per-example ε-regression loss, mean over coordinates."""
    return ((out[0] - out[1]) ** 2).mean(1)


def _setup() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return Eps().double(), torch.randn(N, 2, dtype=torch.float64)


def _reference_lambda1(model: nn.Module, x0: Tensor, chunk: int) -> float:
    """λ1 of the dense Hessian of the objective with chunk c's draws made from PIN_SEED + c."""
    ts, es = [], []
    for c, s in enumerate(range(0, N, chunk)):
        torch.manual_seed(PIN_SEED + c)
        t, e = _draw(x0[s : s + chunk].shape[0], x0[s : s + chunk])
        ts.append(t)
        es.append(e)
    t, e = torch.cat(ts), torch.cat(es)
    hess = dense_hessian_of(
        model, None, lambda out: ((out - e) ** 2).mean(1).mean(), args=(_noisy(x0, t, e), t)
    )
    return float(torch.linalg.eigvalsh(hess)[-1])


@pytest.mark.parametrize("backend", ["func", "double-backward"])
def test_products_see_one_objective(backend: Any) -> None:
    """Two products of one vector agree and the operator's dense matrix is symmetric; the
    caller's random state is untouched."""
    model, x0 = _setup()
    op = HessianOperator(
        model,
        x0,
        torch.zeros(N),
        loss_fn,
        forward=random_forward,
        chunk_size=CHUNK,
        backend=backend,
    )
    state = torch.get_rng_state()
    cols = torch.stack([op(e) for e in torch.eye(op.dim, dtype=torch.float64)], 1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(op(torch.eye(op.dim, dtype=torch.float64)[0]), cols[:, 0])
    assert float((cols - cols.T).abs().max()) <= 1e-12 * float(cols.abs().max())


@pytest.mark.parametrize("chunk", [CHUNK, None])
def test_lambda1_is_that_of_the_pinned_objective(chunk: int | None) -> None:
    """hessian_eigen's λ1_H equals the dense float64 Hessian's of the pinned-draw objective."""
    model, x0 = _setup()
    res = hessian_eigen(
        model,
        x0,
        torch.zeros(N),
        loss_fn,
        forward=random_forward,
        chunk_size=chunk,
        tol=1e-10,
        max_hvps=200,
    )
    ref = _reference_lambda1(model, x0, chunk or N)
    assert abs(float(res.eigenvalues[0]) - ref) <= 1e-8 * ref


def test_agent_sharpness_of_a_random_forward(tmp_path: Path) -> None:
    """Recorded λ1_H of a DDPM whose forward draws t and ε, probe in chunks: the reference's,
    and no asymmetry warning (before: the products saw a new draw each, λ1_H off by 7 % and a
    ``hessian-asymmetric`` warning blaming a second derivative)."""
    model, x0 = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = tmp_path / "r.stiff"
    agent = offline_agent(
        model,
        loss_fn,
        opt,
        rec,
        probe=(x0, torch.zeros(N)),
        forward=random_forward,
        chunk_size=CHUNK,
        **(EXACT | {"gram_every": "never"}),
    )
    for _ in range(2):
        train_step(agent, opt, loss_fn(random_forward(model, x0), x0).mean())
    msgs = close_and_read(agent, rec)
    assert not events(msgs, "hessian-asymmetric")
    ours = last_scalar(msgs, "sharpness/lambda1_h")
    ref = _reference_lambda1(model, x0, CHUNK)
    assert abs(ours - ref) <= 1e-6 * ref
