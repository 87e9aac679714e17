"""README claims, checked as a newcomer would follow them.

"Diffusion, VAE and score-matching objectives": with a VAE's draws in the probe
(``probe=((x, eps), x)``, ``forward=lambda m, b: m(*b)``) every number is of one fixed
objective, and Tr K, λ1_K and λ1_H equal a per-example float64 loop to 1e-15. The reference:
g_i = ∇_θ L_i one example at a time, K = (1/N) Σ (g_i − ḡ)(g_i − ḡ)ᵀ (Tr K and λ1_K from the
N × N centred Gram, whose non-zero spectrum is K's), and λ1_H the top eigenvalue of the dense
Hessian of (1/N) Σ L_i.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from tests.agent.metrics.reference import dense_hessian_of, loop_gradients
from tests.agent.recording import EXACT, close_and_read, last_scalar, offline_agent, train_step

D, Z, N = 6, 2, 16


class Vae(nn.Module):
    """A β-VAE whose reparameterisation noise ε is an input: z = μ + σ ε."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 2 * Z))
        self.dec = nn.Sequential(nn.Linear(Z, 8), nn.Tanh(), nn.Linear(8, D))

    def forward(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.enc(x).chunk(2, 1)
        return self.dec(mu + (0.5 * logvar).exp() * eps), mu, logvar


def vae_loss(out: tuple[Tensor, Tensor, Tensor], x: Tensor) -> Tensor:
    """Per-example ‖x̂ − x‖² + β KL(N(μ, σ²) ‖ N(0, I)), β = 0.5."""
    rec, mu, logvar = out
    kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)
    return ((rec - x) ** 2).sum(1) + 0.5 * kl


def test_vae_with_its_draws_in_the_probe_matches_a_float64_loop(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Vae().double()
    x = torch.randn(N, D, dtype=torch.float64)
    eps = torch.randn(N, Z, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = tmp_path / "vae.stiff"
    agent = offline_agent(
        model, vae_loss, opt, rec, probe=((x, eps), x), forward=lambda m, b: m(*b), **EXACT
    )
    train_step(agent, opt, vae_loss(model(x[:8], eps[:8]), x[:8]).mean())
    msgs = close_and_read(agent, rec)

    g = loop_gradients(model, (x, eps), x, vae_loss, forward=lambda m, b: m(*b))
    c = g - g.mean(0)
    k = c @ c.T / N
    h = dense_hessian_of(model, None, lambda out: vae_loss(out, x).mean(), args=(x, eps))
    refs = {
        "noise/trace_k": torch.trace(k),
        "noise/lambda1_k": torch.linalg.eigvalsh(k)[-1],
        "sharpness/lambda1_h": torch.linalg.eigvalsh(h)[-1],
    }
    for name, ref in refs.items():
        ours = last_scalar(msgs, name)
        assert abs(ours - float(ref)) <= 1e-13 * abs(float(ref)), (name, ours, float(ref))
