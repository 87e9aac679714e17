"""A loss with a stop-gradient (SimSiam, semi-gradient TD) is said: its measured Hessian is not
the Jacobian of the optimizer's step.

Double backward holds a detached copy of the parameters' function fixed, so λ1_H is the top
eigenvalue of ∂₁₁f, while the step θ ← θ − η ∂₁f(θ, θ) has the Jacobian ∂₁₁f + ∂₁₂f. On the
toy SimSiam encoder below the two are 6.3 and 0.21 (float64, dense): a silent λ1_H set a
stability threshold 30 times too strict.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon_agent.metrics.chunk_coupling import stop_gradient_note
from stiffmon_agent.metrics.sharpness import hessian_eigen
from tests.agent.metrics.reference import dense_hessian_of


def two_views(n: int = 12, d: int = 8) -> Tensor:
    x = torch.randn(n, d, dtype=torch.float64)
    noise = 0.1 * torch.randn(n, 2, d, dtype=torch.float64)
    return x[:, None] + noise  # (n, 2, d): example i's two augmentations


def views_forward(model: nn.Module, v: Tensor) -> Tensor:
    return model(v.flatten(0, 1)).view(v.shape[0], 2, -1)


def simsiam(z: Tensor, y: Tensor) -> Tensor:
    """Per-example symmetric negative cosine, the other view's embedding stop-gradient."""
    cos = F.cosine_similarity(z[:, 0], z[:, 1].detach(), dim=1)
    return -(cos + F.cosine_similarity(z[:, 1], z[:, 0].detach(), dim=1)) / 2


def encoder() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6)).double()


def test_simsiam_is_said_and_its_lambda1_h_is_the_frozen_target_hessian() -> None:
    torch.manual_seed(0)
    model, views = encoder(), two_views()
    y = torch.zeros(views.shape[0], dtype=torch.float64)
    note = stop_gradient_note(model, views, y, simsiam, views_forward)
    assert note is not None and "stop-gradient" in note and "threshold" in note

    def objective(z: Tensor) -> Tensor:
        return simsiam(z.view(views.shape[0], 2, -1), y).mean()

    h11 = dense_hessian_of(model, views.flatten(0, 1), objective)
    ours = hessian_eigen(model, views, y, simsiam, forward=views_forward, tol=1e-10, max_hvps=200)
    assert abs(float(ours.eigenvalues[0]) - float(torch.linalg.eigvalsh(h11)[-1])) < 1e-8

    # the step's Jacobian: f(a, b) with b the detached copy, d/dθ of ∂₁f(θ, θ)
    names = [n for n, _ in model.named_parameters()]
    shapes = [q.shape for q in model.parameters()]
    flat = torch.cat([q.detach().reshape(-1) for q in model.parameters()])

    def embed(v: Tensor) -> Tensor:
        parts = v.split([math.prod(s) for s in shapes])
        named = {n: c.view(s) for n, c, s in zip(names, parts, shapes, strict=True)}
        out = torch.func.functional_call(model, named, (views.flatten(0, 1),))
        return out.view(views.shape[0], 2, -1)

    def f(a: Tensor, b: Tensor) -> Tensor:
        za, zb = embed(a), embed(b)
        cos = F.cosine_similarity(za[:, 0], zb[:, 1], dim=1)
        return (-(cos + F.cosine_similarity(za[:, 1], zb[:, 0], dim=1)) / 2).mean()

    jac = torch.func.jacrev(lambda t: torch.func.grad(f)(t, t))(flat)
    step_top = float(torch.linalg.eigvals(jac).real.max())
    assert float(ours.eigenvalues[0]) > 5 * step_top  # why the note has to be said


def test_semi_gradient_td_is_said() -> None:
    torch.manual_seed(0)
    value = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    s = torch.randn(10, 2, 4, dtype=torch.float64)  # (state, next state)
    r = torch.randn(10, dtype=torch.float64)

    def td(v: Tensor, reward: Tensor) -> Tensor:
        return (v[:, 0] - (reward + 0.9 * v[:, 1].detach())) ** 2

    fwd = lambda m, x: m(x.flatten(0, 1)).view(x.shape[0], 2)  # noqa: E731
    assert stop_gradient_note(value, s, r, td, fwd) is not None


def test_a_separate_target_network_and_plain_losses_are_not_said() -> None:
    """BYOL's target network is not measured (the optimizer does not hold it): with it fixed the
    Hessian is the step's Jacobian. Nor is a loss with no detach, or a detach of a constant."""
    torch.manual_seed(0)

    class Byol(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.online, self.target = encoder(), encoder()  # target: an EMA copy

        def forward(self, v: Tensor) -> Tensor:
            return torch.stack([self.online(v[:, 0]), self.target(v[:, 1]).detach()], 1)

    model, views = Byol(), two_views()
    y = torch.zeros(views.shape[0], dtype=torch.float64)
    byol = lambda z, y: -F.cosine_similarity(z[:, 0], z[:, 1], dim=1)  # noqa: E731
    online = list(model.online.parameters())
    assert stop_gradient_note(model, views, y, byol, None, params=online) is None
    mlp = encoder()
    x, c = torch.randn(10, 8, dtype=torch.float64), torch.randint(0, 6, (10,))
    assert stop_gradient_note(mlp, x, c, nn.CrossEntropyLoss(), None) is None
    scaled = lambda out, t: F.cross_entropy(out, t, reduction="none") * out.sum().detach() ** 0  # noqa: E731
    assert stop_gradient_note(mlp, x, c, scaled, None) is None
