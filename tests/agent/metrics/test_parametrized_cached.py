"""A loop that calls ``agent.step()`` inside ``torch.nn.utils.parametrize.cached()``.

The block caches each parametrized weight W = f(θ) at its first access: the loop's forward
computed it from θ before ``optimizer.step()``, and ``backward()`` freed its graph. Before this
release a measurement inside the block read that stale constant: λ1_H came out 10–18 % low and
λ1(P⁻¹H) up to 70 % low with no word said, and the Gram failed ("backward through the graph a
second time"). The references are float64: the dense Hessian over the flat vector of the
optimizer's parameters through a functional forward, and a per-example gradient loop.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from tests.agent.metrics.reference import dense_hessian_of, loop_gradients, rel_err
from tests.agent.recording import (
    EXACT,
    close_and_read,
    last_scalar,
    metric_errors,
    offline_agent,
    train_step,
)

CE = nn.CrossEntropyLoss()


class Squash(nn.Module):
    """W = 1.5 tanh(X), a parametrization of the user's own."""

    def forward(self, x: Tensor) -> Tensor:
        return 1.5 * torch.tanh(x)


def _model(kind: str) -> nn.Sequential:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)
    ).double()
    if kind == "own":
        parametrize.register_parametrization(model[0], "weight", Squash())
    elif kind == "orthogonal":
        torch.nn.utils.parametrizations.orthogonal(model[2])
    else:
        torch.nn.utils.parametrizations.spectral_norm(model[2])
    return model


def _probe() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(12, 4, dtype=torch.float64, generator=gen), torch.arange(12) % 3


def _adam_p(opt: torch.optim.Adam, params: list[nn.Parameter]) -> Tensor:
    """Adam's P = (1 − β1^t)(√(v/(1 − β2^t)) + ε), flat, in the order of ``params``."""
    group = opt.param_groups[0]
    b1, b2 = group["betas"]
    rows = []
    for q in params:
        st = opt.state[q]
        t = float(st["step"])
        rows.append((1 - b1**t) * ((st["exp_avg_sq"] / (1 - b2**t)).sqrt() + group["eps"]))
    return torch.cat([r.reshape(-1) for r in rows])


@pytest.mark.parametrize("kind", ["own", "orthogonal", "spectral_norm"])
def test_measurements_inside_cached_equal_float64_references(kind: str, tmp_path: Path) -> None:
    model, (x, y) = _model(kind), _probe()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.0, 0.99))
    rec = tmp_path / "r.stiff"
    agent = offline_agent(model, CE, opt, rec, probe=(x, y), density_every="never", **EXACT)
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        xb = torch.randn(8, 4, dtype=torch.float64, generator=gen)
        yb = torch.randint(0, 3, (8,), generator=gen)
        with parametrize.cached():
            out = model(xb)
            train_step(agent, opt, CE(out, yb), out, yb)
    msgs = close_and_read(agent, rec)
    assert metric_errors(msgs) == {}

    model.eval()  # the references: eval mode, as measured
    h = dense_hessian_of(model, x, lambda out: CE(out, y))
    d = _adam_p(opt, [q for q in model.parameters() if q.requires_grad]).rsqrt()
    g = loop_gradients(model, x, y, CE)
    trace_k = ((g - g.mean(0)) ** 2).sum(1).mean()
    lam = torch.linalg.eigvalsh(h)[-1]
    lam_p = torch.linalg.eigvalsh(d[:, None] * h * d[None])[-1]
    assert last_scalar(msgs, "sharpness/lambda1_h") == pytest.approx(lam.item(), rel=1e-8)
    assert last_scalar(msgs, "sharpness/lambda1_precond") == pytest.approx(lam_p.item(), rel=1e-8)
    assert last_scalar(msgs, "noise/trace_k") == pytest.approx(trace_k.item(), rel=1e-10)


def test_the_loop_s_cache_is_left_as_it_was(tmp_path: Path) -> None:
    model, (x, y) = _model("own"), _probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = tmp_path / "r.stiff"
    agent = offline_agent(model, CE, opt, rec, probe=(x, y), density_every="never", **EXACT)
    with parametrize.cached():
        out = model(x)
        loss = CE(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        cache, cached_w = parametrize._cache, model[0].weight
        agent.step(loss, out, y)
        assert parametrize._cache_enabled == 1 and parametrize._cache is cache
        assert model[0].weight is cached_w  # the loop's own cached W, not recomputed
    assert parametrize._cache_enabled == 0
    msgs = close_and_read(agent, rec)
    assert metric_errors(msgs) == {}


def test_a_forward_that_enters_cached_itself_keeps_the_loop_s_cache(tmp_path: Path) -> None:
    """A forward with its own ``cached()`` block: inside the measurement it caches apart."""

    class Cached(nn.Sequential):
        def forward(self, x: Tensor) -> Tensor:
            with parametrize.cached():
                return super().forward(x)

    model, (x, y) = _model("own"), _probe()
    model.__class__ = Cached
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = tmp_path / "r.stiff"
    agent = offline_agent(model, CE, opt, rec, probe=(x, y), density_every="never", **EXACT)
    for _ in range(2):
        with parametrize.cached():
            out = model(x)
            train_step(agent, opt, CE(out, y), out, y)
    msgs = close_and_read(agent, rec)
    model.eval()
    lam = torch.linalg.eigvalsh(dense_hessian_of(model, x, lambda out: CE(out, y)))[-1]
    assert last_scalar(msgs, "sharpness/lambda1_h") == pytest.approx(lam.item(), rel=1e-8)
    g = loop_gradients(model, x, y, CE)
    assert (
        rel_err(
            g.new_tensor(last_scalar(msgs, "noise/trace_k")), ((g - g.mean(0)) ** 2).sum(1).mean()
        )
        < 1e-10
    )
