r"""Gradient noise from the per-example gradient Gram matrix (DESIGN §3).

With per-example gradients g_1 … g_N on the train probe and ḡ = (1/N) Σ g_i:

* K = (1/N) Σ (g_i − ḡ)(g_i − ḡ)ᵀ, the gradient covariance (Jastrzebski et al. 2020,
  arXiv:2002.09572). With D the N×P matrix of centred gradients, K = DᵀD / N and DDᵀ = HGH with
  H = I − 11ᵀ/N, so the non-zero eigenvalues of K are those of the N×N matrix HGH / N: the
  spectrum is exact without forming anything P×P. Tr K = tr(HGH) / N.
* Conditioning λ_k / λ_1 of the top eigenvalues of K.
* Gradient noise scale B_simple = tr(Σ) / ‖G‖² (McCandlish et al. 2018) with the unbiased
  in-batch estimates tr(Σ) = Σ ‖g_i − ḡ‖² / (N − 1) and ‖G‖² = ‖ḡ‖² − tr(Σ) / N.
  B_simple is NaN when the estimate of ‖G‖² is ≤ 0 (the noise hides the mean gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def centred_gram(gram: Tensor) -> Tensor:
    """HGH with H = I − 11ᵀ/N: the Gram matrix of the centred gradients g_i − ḡ."""
    row = gram.mean(dim=0, keepdim=True)
    col = gram.mean(dim=1, keepdim=True)
    return gram - row - col + gram.mean()


@dataclass(frozen=True)
class GradientNoise:
    """Gradient-noise summary of one probe set.

    Attributes:
        trace_k: Tr K.
        eigenvalues: Top-k eigenvalues of K, largest first (λ1_K first).
        conditioning: λ_k / λ_1 for each of them (1.0 first).
        mean_grad_sq: ‖ḡ‖² (biased: the squared norm of the probe's mean gradient).
        trace_sigma: Unbiased tr(Σ) = Σ ‖g_i − ḡ‖² / (N − 1).
        grad_sq_unbiased: Unbiased ‖G‖² = ‖ḡ‖² − tr(Σ) / N.
        b_simple: tr(Σ) / ‖G‖² (NaN if ‖G‖² ≤ 0).
        n: Number of examples.
    """

    trace_k: float
    eigenvalues: Tensor
    conditioning: Tensor
    mean_grad_sq: float
    trace_sigma: float
    grad_sq_unbiased: float
    b_simple: float
    n: int

    @property
    def lambda1(self) -> float:
        """λ1_K, the largest eigenvalue of the gradient covariance."""
        return float(self.eigenvalues[0]) if self.eigenvalues.numel() else float("nan")


def gradient_noise(gram: Tensor, k: int = 5) -> GradientNoise:
    """Gradient covariance spectrum, trace and noise scale from the Gram matrix G.

    Args:
        gram: (N, N) per-example gradient Gram matrix of the train probe.
        k: How many top eigenvalues of K to return (at most N − 1 are non-zero).

    Raises:
        ValueError: If N < 2 (no covariance can be estimated).
    """
    n = gram.shape[0]
    if gram.dim() != 2 or gram.shape[1] != n:
        raise ValueError(f"gram must be square, got shape {tuple(gram.shape)}")
    if n < 2:
        raise ValueError(f"gradient noise needs at least 2 probe examples, got {n}")
    g = gram.to(torch.float64)
    gc = centred_gram(g)
    gc = 0.5 * (gc + gc.T)
    trace_c = float(gc.diagonal().sum())
    evals = torch.linalg.eigvalsh(gc / n).flip(0)[: max(0, min(k, n))]
    lam1 = evals[0] if evals.numel() else torch.tensor(float("nan"), dtype=torch.float64)
    conditioning = evals / lam1 if float(lam1) != 0.0 else torch.full_like(evals, float("nan"))
    mean_sq = float(g.mean())  # ‖ḡ‖² = 1ᵀG1 / N²
    trace_sigma = trace_c / (n - 1)
    grad_sq = mean_sq - trace_sigma / n
    return GradientNoise(
        trace_k=trace_c / n,
        eigenvalues=evals,
        conditioning=conditioning,
        mean_grad_sq=mean_sq,
        trace_sigma=trace_sigma,
        grad_sq_unbiased=grad_sq,
        b_simple=trace_sigma / grad_sq if grad_sq > 0 else float("nan"),
        n=n,
    )
