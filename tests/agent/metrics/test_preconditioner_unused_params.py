"""λ1(P⁻¹H) of Adam with a parameter that never gets a gradient (an unused branch the optimizer
holds, as under DDP's ``find_unused_parameters=True``): torch's Adam skips it, so it keeps no
state and does not move. It used to make the whole preconditioner unreadable ("no optimizer state
yet (before the first step)": λ1(P⁻¹H) NaN for the whole run); it now gets P = ∞ like a
parameter the optimizer does not hold.

The reference: P from a hand-written Adam over the used parameters, the dense float64 Hessian
over them, and the top eigenvalue of P⁻¹H.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stiffmon_agent.metrics import diagonal_preconditioner, hessian_eigen
from tests.agent.metrics.reference import dense_hessian_of


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        self.unused = nn.Linear(3, 2)  # held by the optimizer, never in the loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_unused_parameters_drop_out_of_the_preconditioned_hessian() -> None:
    torch.manual_seed(0)
    model = Branchy().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (12,), generator=g)
    ce = nn.CrossEntropyLoss()
    b1, b2, eps, t = 0.9, 0.95, 1e-8, 4
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(b1, b2), eps=eps)
    used = list(model.body.parameters())
    v = [torch.zeros_like(p) for p in used]
    for _ in range(t):
        opt.zero_grad()
        ce(model(x), y).backward()
        v = [b2 * vi + (1 - b2) * p.grad.detach() ** 2 for vi, p in zip(v, used, strict=True)]  # type: ignore[operator]
        opt.step()
    params = list(model.parameters())
    diag, why = diagonal_preconditioner(opt, params)
    assert diag is not None, why
    ref_p = torch.cat([((1 - b1**t) * ((vi / (1 - b2**t)).sqrt() + eps)).reshape(-1) for vi in v])
    n_used = ref_p.numel()
    torch.testing.assert_close(diag[:n_used], ref_p, rtol=1e-12, atol=0)
    assert torch.isinf(diag[n_used:]).all()
    h = dense_hessian_of(model, x, lambda out: ce(out, y))[:n_used, :n_used]  # body first
    ref = torch.linalg.eigvals(torch.diag(1 / ref_p) @ h).real.max()
    got = hessian_eigen(model, x, y, ce, preconditioner=diag, tol=1e-10, max_hvps=500)
    assert float(got.eigenvalues[0]) == pytest.approx(float(ref), rel=1e-7)


def test_before_any_step_there_is_still_no_preconditioner() -> None:
    model = Branchy()
    diag, why = diagonal_preconditioner(
        torch.optim.Adam(model.parameters()), list(model.parameters())
    )
    assert diag is None and "first step" in why
