r"""Gradient noise from the per-example gradient Gram matrix (DESIGN §3).

With per-example gradients g_1 … g_N on the train probe and ḡ = (1/N) Σ g_i:

* K = (1/N) Σ (g_i − ḡ)(g_i − ḡ)ᵀ, the gradient covariance (Jastrzebski et al. 2020,
  arXiv:2002.09572). With D the N×P matrix of centred gradients, K = DᵀD / N and DDᵀ = HGH with
  H = I − 11ᵀ/N, so the non-zero eigenvalues of K are those of the N×N matrix HGH / N: the
  spectrum is exact without forming anything P×P. Tr K = tr(HGH) / N.
* Conditioning λ_k / λ_1 of the top eigenvalues of K.
* Gradient noise scale B_simple = tr(Σ) / ‖G‖² (McCandlish et al. 2018) with the unbiased
  in-batch estimates tr(Σ) = Σ ‖g_i − ḡ‖² / (N − 1) and ‖G‖² = ‖ḡ‖² − tr(Σ) / N.
  B_simple is NaN when the estimate of ‖G‖² is ≤ 0 (the noise hides the mean gradient) or
  within the Gram's rounding of 0.

Rounding. Each Gram entry carries an error up to about γ ε ‖g_i‖‖g_j‖ (ε the unit roundoff of
the dtype the Gram was computed in), so by Cauchy–Schwarz Tr K = tr(HGH)/N is known only to
ε_K = γ ε tr(G)/N and ‖ḡ‖² to about the same, with γ = :data:`ROUNDING_FACTOR`. Examples whose
gradients agree to ~7 digits (duplicated examples in float32) gave Tr K = −2.8e-7 where the
float64 reference is +2.8e-13, and a negative B_simple. Below ε_K, Tr K, tr(Σ) and λ1_K are 0
(the true value is in [0, ε_K]), the conditioning NaN, and :attr:`GradientNoise.unresolved`
says so; B_simple is NaN unless ‖G‖² > 2 ε_K. Eigenvalues of K are ≥ 0, and exactly 0 past
N − 1 (the rank of N centred gradients) and, after λ1_K, where within ε_K of 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# γ of the module docstring: the Gram's relative rounding, in units of ε (measured ≤ 0.3 ε
# for float32 ghost and loop Grams of a small MLP; the margin covers long dot products).
ROUNDING_FACTOR = 32.0


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
        resolution: ε_K, the rounding level of Tr K (see the module docstring).
        unresolved: Why Tr K and λ1_K are shown as 0 (within the rounding level), else None.
    """

    trace_k: float
    eigenvalues: Tensor
    conditioning: Tensor
    mean_grad_sq: float
    trace_sigma: float
    grad_sq_unbiased: float
    b_simple: float
    n: int
    resolution: float = 0.0
    unresolved: str | None = None

    @property
    def lambda1(self) -> float:
        """λ1_K, the largest eigenvalue of the gradient covariance."""
        return float(self.eigenvalues[0]) if self.eigenvalues.numel() else math.nan


def gradient_noise(gram: Tensor, k: int = 5, *, eps: float | None = None) -> GradientNoise:
    """Gradient covariance spectrum, trace and noise scale from the Gram matrix G.

    Args:
        gram: (N, N) per-example gradient Gram matrix of the train probe.
        k: How many top eigenvalues of K to return (at most N − 1 are non-zero; the rest are
            returned as exact zeros).
        eps: Unit roundoff of the dtype the Gram was computed in (pass
            ``torch.finfo(float32).eps`` for a float32 Gram cast to float64); None: that of
            ``gram.dtype``.

    Raises:
        ValueError: If N < 2 (no covariance can be estimated).
    """
    n = gram.shape[0]
    if gram.dim() != 2 or gram.shape[1] != n:
        raise ValueError(f"gram must be square, got shape {tuple(gram.shape)}")
    if n < 2:
        raise ValueError(f"gradient noise needs at least 2 probe examples, got {n}")
    if eps is None:
        eps = torch.finfo(gram.dtype).eps if gram.dtype.is_floating_point else 0.0
    g = gram.to(torch.float64)
    gc = centred_gram(g)
    gc = 0.5 * (gc + gc.T)
    trace_c = float(gc.diagonal().sum())
    evals = torch.linalg.eigvalsh(gc / n).flip(0)[: max(0, min(k, n))].clamp_min(0.0)
    evals[n - 1 :] = 0.0  # N centred gradients span at most N − 1 dimensions
    resolution = ROUNDING_FACTOR * eps * max(float(g.diagonal().sum()), 0.0) / n
    tail = evals[1:]
    tail[tail <= resolution] = 0.0  # within rounding of 0 (a rank-deficient K)
    mean_sq = float(g.mean())  # ‖ḡ‖² = 1ᵀG1 / N²
    unresolved = None
    if resolution > 0.0 and not trace_c / n > resolution:
        unresolved = (
            f"Tr K = {trace_c / n:.3g} is within the Gram's rounding (±{resolution:.3g}, "
            f"{ROUNDING_FACTOR:g} ε × mean ‖g_i‖²): the {n} examples' gradients agree to "
            "rounding (duplicated examples?); Tr K, tr(Σ) and λ1_K are shown as 0 (the true "
            "value lies in [0, that level]) and the conditioning is NaN"
        )
        trace_c = 0.0
        evals = torch.zeros_like(evals)
    lam1 = evals[0] if evals.numel() else torch.tensor(math.nan, dtype=torch.float64)
    conditioning = (
        evals / lam1
        if unresolved is None and float(lam1) > 0.0
        else torch.full_like(evals, math.nan)
    )
    trace_sigma = trace_c / (n - 1)
    grad_sq = mean_sq - trace_sigma / n
    return GradientNoise(
        trace_k=trace_c / n,
        eigenvalues=evals,
        conditioning=conditioning,
        mean_grad_sq=mean_sq,
        trace_sigma=trace_sigma,
        grad_sq_unbiased=grad_sq,
        b_simple=trace_sigma / grad_sq if grad_sq > 2.0 * resolution else math.nan,
        n=n,
        resolution=resolution,
        unresolved=unresolved,
    )
