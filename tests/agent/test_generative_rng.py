"""Generative objectives whose forward or loss draws random numbers (a DDPM's t and ε, sliced
score matching's projections): what the agent measures, against float64 references, and what
it says when the draws escape the seeding of the Hessian's products (numpy, Python ``random``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from stiffmon_agent.metrics.pinned_rng import PIN_SEED, unpinned
from tests.agent.recording import (
    EXACT,
    close_and_read,
    events,
    last_scalar,
    offline_agent,
    train_step,
)

T, N, D = 50, 12, 2


class Net(nn.Module):
    """A small MLP: ε̂(x_t, t) for the DDPM (``extra=1``), the score s(x) for score matching."""

    def __init__(self, extra: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D + extra, 10), nn.Tanh(), nn.Linear(10, D))

    def forward(self, *xs: Tensor) -> Tensor:
        return self.net(torch.cat(xs, 1))


def _noisy(x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    ab = torch.cumprod(1 - torch.linspace(1e-3, 0.2, T, dtype=torch.float64), 0)[t][:, None]
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def numpy_ddpm(model: nn.Module, x0: Tensor) -> tuple[Tensor, Tensor]:
    """A DDPM forward drawing t and ε with numpy (which seeding torch does not fix)."""
    t = torch.from_numpy(np.random.randint(0, T, x0.shape[0]))
    eps = torch.from_numpy(np.random.randn(*x0.shape))
    return model(_noisy(x0, t, eps), (t / T).to(x0)[:, None]), eps


def torch_ddpm(model: nn.Module, x0: Tensor) -> tuple[Tensor, Tensor]:
    """The same forward drawing with torch's default generator."""
    t, eps = torch.randint(0, T, (x0.shape[0],)), torch.randn_like(x0)
    return model(_noisy(x0, t, eps), (t / T).to(x0)[:, None]), eps


def eps_loss(out: tuple[Tensor, Tensor], _y: Tensor) -> Tensor:
    return ((out[0] - out[1]) ** 2).mean(1)


def score_forward(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """s(x) with x a leaf that requires grad (the loss differentiates with respect to it)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        return model(x), x


def sliced_score_loss(out: tuple[Tensor, Tensor], _y: Tensor, v: Tensor | None = None) -> Tensor:
    """Sliced score matching, vᵀ ∇_x(vᵀ s(x)) + ½ (vᵀ s(x))², v ~ N(0, I) drawn in the loss."""
    s, x = out
    v = torch.randn_like(s) if v is None else v
    with torch.enable_grad():
        gx = torch.autograd.grad((s * v).sum(), x, create_graph=True)[0]
    return (gx * v).sum(1) + 0.5 * (s * v).sum(1) ** 2


def _record(tmp_path: Path, model: nn.Module, forward: Any, loss: Any, **kw: Any) -> list[Any]:
    torch.manual_seed(1)
    x0 = torch.randn(N, D, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = tmp_path / "r.stiff"
    agent = offline_agent(
        model, loss, opt, rec, probe=(x0, torch.zeros(N)), forward=forward, **(EXACT | kw)
    )
    for _ in range(2):
        train_step(agent, opt, loss(forward(model, x0), x0).mean())
    return close_and_read(agent, rec)


def _model(extra: int) -> nn.Module:
    torch.manual_seed(0)
    return Net(extra).double()


def test_unpinned_tells_numpy_from_torch_draws() -> None:
    assert unpinned(lambda: torch.from_numpy(np.random.randn(3)), [])
    assert not unpinned(lambda: torch.randn(3), [])
    assert not unpinned(lambda: torch.ones(3), [])
    own = torch.Generator().manual_seed(0)
    assert unpinned(lambda: torch.randn(3, generator=own), [])


def test_numpy_draws_in_chunks_are_said(tmp_path: Path) -> None:
    """λ1_H of products that each draw anew (chunks of 5): a warning says the Hessian is not of
    one objective and names numpy (before: only a ``hessian-asymmetric`` warning blaming a
    layer's second derivative, and a gram-fallback note claiming one seeded draw)."""
    np.random.seed(0)
    msgs = _record(tmp_path, _model(1), numpy_ddpm, eps_loss, chunk_size=5)
    said = [e.message for e in events(msgs, "hessian-chunked")]
    assert said and "cannot seed" in said[0] and "numpy" in said[0]
    (gram,) = [e.message for e in events(msgs, "gram-fallback") if "random" in e.message]
    assert "cannot seed" in gram


@pytest.mark.parametrize("chunk", [128, None])
def test_numpy_draws_in_one_chunk_are_said(tmp_path: Path, chunk: int | None) -> None:
    """The probe in one chunk (the default chunk_size of 128 over 12 examples, or no chunking
    at all: chunk_size=None): said too."""
    np.random.seed(0)
    msgs = _record(tmp_path, _model(1), numpy_ddpm, eps_loss, gram_every="never", chunk_size=chunk)
    said = [e.message for e in events(msgs, "hessian-chunked")]
    assert said and "cannot seed" in said[0]


def test_torch_draws_are_not_flagged(tmp_path: Path) -> None:
    msgs = _record(tmp_path, _model(1), torch_ddpm, eps_loss, chunk_size=5)
    assert not events(msgs, "hessian-chunked")
    assert not events(msgs, "hessian-asymmetric")


def _ssm_reference(model: nn.Module, x0: Tensor, chunk: int) -> float:
    """λ1 of the dense float64 Hessian of sliced score matching with chunk c's projections
    drawn from PIN_SEED + c (as the pinned products draw them)."""
    vs = []
    for c, s in enumerate(range(0, N, chunk)):
        torch.manual_seed(PIN_SEED + c)
        vs.append(torch.randn(min(chunk, N - s), D, dtype=torch.float64))
    v = torch.cat(vs)
    names = [n for n, _ in model.named_parameters()]
    shapes = [q.shape for q in model.parameters()]
    flat = torch.cat([q.detach().reshape(-1) for q in model.parameters()])

    def objective(w: Tensor) -> Tensor:
        ps = dict(
            zip(
                names,
                [
                    c.view(s)
                    for c, s in zip(w.split([s.numel() for s in shapes]), shapes, strict=True)
                ],
                strict=True,
            )
        )
        x = x0.detach().requires_grad_()
        s = torch.func.functional_call(model, ps, (x,))
        return sliced_score_loss((s, x), x0, v).mean()

    hess = torch.autograd.functional.hessian(objective, flat)
    return float(torch.linalg.eigvalsh(hess)[-1])


def test_sliced_score_matching_draws_in_the_loss(tmp_path: Path) -> None:
    """Projections drawn in loss_fn: λ1_H is the float64 dense Hessian's with the pinned draws,
    and the Gram's note says the loss is random (before: that the examples are coupled by a
    BatchNorm or a layer that mixes the batch)."""
    model = _model(0)
    msgs = _record(tmp_path, model, score_forward, sliced_score_loss, chunk_size=5)
    torch.manual_seed(1)
    x0 = torch.randn(N, D, dtype=torch.float64)
    ref = _ssm_reference(model, x0, 5)
    assert abs(last_scalar(msgs, "sharpness/lambda1_h") - ref) <= 1e-8 * ref
    notes = [e.message for e in events(msgs, "gram-fallback")]
    assert any("is random in eval mode" in m for m in notes), notes
    assert not any("coupled across examples" in m for m in notes), notes
    assert not events(msgs, "hessian-chunked")


def test_numpy_projections_in_an_input_gradient_loss_are_said() -> None:
    """A loss that differentiates with respect to the inputs (sliced score matching written
    plainly, with no ``enable_grad``) cannot run without gradients: the check runs with them
    and still finds the numpy draws (before: it failed under ``no_grad`` and said nothing)."""
    from stiffmon_agent.metrics.chunk_coupling import chunking_changes_losses

    def plain_forward(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.detach().requires_grad_()
        return model(x), x

    def numpy_ssm(out: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
        v = torch.from_numpy(np.random.randn(*out[0].shape))
        return sliced_score_loss(out, y, v)

    torch.manual_seed(1)
    x0 = torch.randn(N, D, dtype=torch.float64)
    said = chunking_changes_losses(_model(0), x0, torch.zeros(N), numpy_ssm, plain_forward, 5)
    assert said is not None and "cannot seed" in said
    torch_said = chunking_changes_losses(
        _model(0), x0, torch.zeros(N), sliced_score_loss, plain_forward, 5
    )
    assert torch_said is None
