"""A plain callable loss that ignores a target other than -100 (segmentation's 255).

The agent takes -100 for a plain callable's ignore index. A ``lambda out, y:
F.cross_entropy(out, y, ignore_index=255, reduction="none")`` on (N, C, H, W) logits returns 0
at the ignored pixels, which then counted in each image's mean: on the probe below λ1_H came out
44 % low and Tr K 68 % low, with nothing said. Now such a callable is refused at the first
measurement with the way out, and a callable that declares its index (an ``ignore_index``
attribute, or a ``functools.partial``'s keyword) is measured as torch's mean-reduced loss: every
figure against float64 references (a dense Hessian, a naive per-example loop).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon_agent.metrics.noise import gradient_noise
from tests.agent.metrics.reference import dense_hessian_of
from tests.agent.recording import (
    EXACT,
    close_and_read,
    events,
    last_scalar,
    offline_agent,
    scalar_values,
    train_step,
)

C, N = 3, 8


def _setup() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, C, 1)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N, 4, 4), generator=g)
    for i in range(N):  # image i counts 2 + 2i of its 16 pixels (all of the last one)
        y[i].reshape(-1)[2 + 2 * i :] = 255
    return model, x, y


def _record(tmp_path: Path, loss_fn: Any) -> tuple[nn.Module, Tensor, Tensor, list[Any]]:
    model, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay where the refs are
    rec = tmp_path / "seg.stiff"
    agent = offline_agent(model, loss_fn, opt, rec, probe=(x, y), **EXACT)
    loss = F.cross_entropy(model(x), y, ignore_index=255)  # what the loop trains on
    train_step(agent, opt, loss)
    return model, x, y, close_and_read(agent, rec)


def _per_pixel(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, ignore_index=255, reduction="none")


def _declared() -> Any:
    def loss(out: Tensor, y: Tensor) -> Tensor:
        return _per_pixel(out, y)

    loss.ignore_index = 255  # type: ignore[attr-defined]
    return loss


@pytest.mark.parametrize(
    "loss_fn",
    [_declared(), functools.partial(F.cross_entropy, ignore_index=255, reduction="none")],
    ids=["attribute", "partial"],
)
def test_a_declared_ignore_index_is_measured_as_torchs_mean(tmp_path: Path, loss_fn: Any) -> None:
    model, x, y, msgs = _record(tmp_path, loss_fn)
    model.eval()
    objective = lambda out: F.cross_entropy(out, y, ignore_index=255)  # noqa: E731
    lam = float(torch.linalg.eigvalsh(dense_hessian_of(model, x, objective))[-1])
    assert last_scalar(msgs, "sharpness/lambda1_h") == pytest.approx(lam, rel=1e-6)
    cbar = float((y != 255).sum()) / N  # L_i = Σ_t ℓ_it / c̄: (1/N) Σ L_i is the objective
    rows = []
    for i in range(N):
        li = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], ignore_index=255, reduction="sum")
        grads = torch.autograd.grad(li / cbar, list(model.parameters()))
        rows.append(torch.cat([t.reshape(-1) for t in grads]))
    g = torch.stack(rows)
    assert last_scalar(msgs, "noise/trace_k") == pytest.approx(
        gradient_noise(g @ g.T).trace_k, rel=1e-9
    )


def test_an_undeclared_ignore_index_is_refused_with_the_way_out(tmp_path: Path) -> None:
    _, _, _, msgs = _record(tmp_path, lambda out, y: _per_pixel(out, y))
    errors = [e.message for e in events(msgs, "metric-error")]
    assert len(errors) == 2  # the Gram and the sharpness, not a silently scaled number
    for text in errors:
        assert "the probe's targets hold 255, not one of the outputs' 3 classes" in text
        assert "loss_fn.ignore_index = 255" in text
    assert scalar_values(msgs, "sharpness/lambda1_h") == []
    assert scalar_values(msgs, "noise/trace_k") == []
