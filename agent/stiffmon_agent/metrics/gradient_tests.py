r"""Cockpit's batch-size tests from the per-example gradient Gram matrix (no extra backward pass).

Notation: a batch of B examples with per-example gradients ∇ℓ_i, the batch gradient
ḡ = (1/B) Σ_i ∇ℓ_i and the Gram matrix G_ij = ∇ℓ_i·∇ℓ_j. Everything below needs only
G_ii = ‖∇ℓ_i‖², the row means (1/B) Σ_j G_ij = ∇ℓ_i·ḡ and mean(G) = ‖ḡ‖².

* **Norm test** (Byrd, Chin, Nocedal & Wu 2012, "Sample size selection in optimization methods
  for machine learning", eq. 3.9): the batch is large enough if
  Var_i(∇ℓ_i) / B ≤ θ² ‖ḡ‖², with the sample variance ℓ₁-norm
  Var = (1/(B−1)) Σ_i ‖∇ℓ_i − ḡ‖² = (1/(B−1)) (Σ_i G_ii − B ‖ḡ‖²).
  θ_max = √(Var / (B ‖ḡ‖²)) is the smallest θ the batch passes with.
* **Inner-product test** (Bollapragada, Byrd & Nocedal 2018, "Adaptive sampling strategies for
  stochastic optimization", eq. 2.6): Var_i(∇ℓ_i·ḡ) / B ≤ θ² ‖ḡ‖⁴ with
  Var = (1/(B−1)) Σ_i (∇ℓ_i·ḡ − ‖ḡ‖²)² = (1/(B−1)) (Σ_i (∇ℓ_i·ḡ)² − B ‖ḡ‖⁴);
  θ_max = √(Var / (B ‖ḡ‖⁴)).
* **Orthogonality test** (Bollapragada et al. 2018, eq. 3.3): the components of ∇ℓ_i orthogonal
  to ḡ must be small, Var_i(∇ℓ_i − (∇ℓ_i·ḡ / ‖ḡ‖²) ḡ) / B ≤ ν² ‖ḡ‖² with
  Var = (1/(B−1)) Σ_i ‖∇ℓ_i − (∇ℓ_i·ḡ/‖ḡ‖²) ḡ‖² = (1/(B−1)) Σ_i (G_ii − (∇ℓ_i·ḡ)²/‖ḡ‖²);
  ν_max = √(Var / (B ‖ḡ‖²)).

**Suggested batch size** for a chosen θ (Byrd et al. eq. 3.12, Bollapragada et al. eq. 4.7
adapted as Cockpit does): the size at which the estimated variance would just pass,
B_θ = Var / (θ² ‖ḡ‖²) (norm, orthogonality) and Var / (θ² ‖ḡ‖⁴) (inner product); equivalently
B_θ = B θ_max² / θ². It does not depend on the probe size B except through the estimates.
Defaults are the values of Bollapragada et al.'s experiments, θ = 0.9 for the norm and
inner-product tests and ν = tan 80° ≈ 5.84 for the orthogonality test.

**Scaling convention.** Cockpit computes these from BackPACK's per-example gradients *of the mean
loss*, ∇ℓ_i / B, multiplying back by B where needed. Every quantity above is a ratio that is
invariant to a common rescaling ∇ℓ_i → c ∇ℓ_i (numerators and denominators have the same degree),
so the values from a Gram matrix of per-example gradients of the per-example losses (what
:func:`~stiffmon_agent.metrics.gram.per_example_gram` returns) or of the mean loss, or of a
``sum`` loss, are identical: there is no 1/B or B² to get right. ``B`` is the number of examples
in the Gram matrix (the train probe), the batch the tests are about. ‖ḡ‖² is the biased plug-in
estimate mean(G), as in the papers and in Cockpit. With ‖ḡ‖² = 0 the tests are undefined (NaN),
and so they are with ‖ḡ‖² within the Gram's rounding of 0, ≤ γ ε tr(G) / B
(:data:`~stiffmon_agent.metrics.noise.ROUNDING_FACTOR` γ, ε the Gram's unit roundoff): examples
whose gradients cancel exactly (ḡ = 0 in float64) gave a float32 ‖ḡ‖² of +1e-7 in 51 of 200
draws and θ_max up to 14,568 instead of undefined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from stiffmon_agent.metrics.noise import ROUNDING_FACTOR

DEFAULT_THETA_NORM = 0.9
DEFAULT_THETA_INNER = 0.9
DEFAULT_NU_ORTHO = 5.84  # tan(80°), Bollapragada et al. 2018


@dataclass(frozen=True)
class GradientTests:
    """Cockpit's three batch-size tests on one batch.

    Attributes:
        norm_test: θ_max of the norm test.
        inner_product_test: θ_max of the inner-product test.
        orthogonality_test: ν_max of the orthogonality test.
        var_norm: (1/(B−1)) Σ ‖∇ℓ_i − ḡ‖².
        var_inner: (1/(B−1)) Σ (∇ℓ_i·ḡ − ‖ḡ‖²)².
        var_ortho: (1/(B−1)) Σ ‖∇ℓ_i − (∇ℓ_i·ḡ/‖ḡ‖²) ḡ‖².
        grad_sq: ‖ḡ‖² = mean(G).
        n: The batch size B (number of examples in G).
        resolution: The rounding level of ‖ḡ‖² (the tests are NaN at or below it).
    """

    norm_test: float
    inner_product_test: float
    orthogonality_test: float
    var_norm: float
    var_inner: float
    var_ortho: float
    grad_sq: float
    n: int
    resolution: float = 0.0

    def suggested_batch(
        self,
        theta_norm: float = DEFAULT_THETA_NORM,
        theta_inner: float = DEFAULT_THETA_INNER,
        nu_ortho: float = DEFAULT_NU_ORTHO,
    ) -> dict[str, float]:
        """Batch sizes B_θ at which each test would just pass for the given θ / ν.

        Returns:
            ``{"norm_test": …, "inner_product_test": …, "orthogonality_test": …}`` (NaN where
            ‖ḡ‖² = 0). Real numbers: round up to use one.
        """
        for name, v in (("theta_norm", theta_norm), ("theta_inner", theta_inner), ("nu", nu_ortho)):
            if not v > 0:
                raise ValueError(f"{name} must be positive, got {v}")
        g2 = self.grad_sq
        if not g2 > max(self.resolution, 0.0):
            return {k: math.nan for k in ("norm_test", "inner_product_test", "orthogonality_test")}
        return {
            "norm_test": self.var_norm / (theta_norm**2 * g2),
            "inner_product_test": self.var_inner / (theta_inner**2 * g2 * g2),
            "orthogonality_test": self.var_ortho / (nu_ortho**2 * g2),
        }


def gradient_tests(gram: Tensor, *, eps: float | None = None) -> GradientTests:
    """Norm, inner-product and orthogonality tests (θ_max, ν_max) from a Gram matrix.

    Args:
        gram: (B, B) Gram matrix G_ij = ∇ℓ_i·∇ℓ_j of one batch (any common scaling).
        eps: Unit roundoff of the dtype the Gram was computed in (a float32 Gram cast to
            float64: ``torch.finfo(torch.float32).eps``); None: that of ``gram.dtype``.

    Returns:
        The three tests and their variance estimates (see the module docstring for the maths).

    Raises:
        ValueError: If ``gram`` is not square or B < 2 (no sample variance).
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be square, got shape {tuple(gram.shape)}")
    b = gram.shape[0]
    if b < 2:
        raise ValueError(f"the gradient tests need at least 2 examples, got {b}")
    if eps is None:
        eps = torch.finfo(gram.dtype).eps if gram.dtype.is_floating_point else 0.0
    g = gram.detach().to(torch.float64)
    g = 0.5 * (g + g.T)
    sq = g.diagonal()  # ‖∇ℓ_i‖²
    proj = g.mean(dim=1)  # ∇ℓ_i·ḡ
    g2 = float(g.mean())  # ‖ḡ‖²
    var_norm = max(float(sq.sum()) - b * g2, 0.0) / (b - 1)
    var_inner = float(((proj - g2) ** 2).sum()) / (b - 1)
    resolution = ROUNDING_FACTOR * eps * max(float(sq.sum()), 0.0) / b
    if g2 > resolution:
        ortho = (sq - proj**2 / g2).clamp_min(0.0)  # Cauchy–Schwarz: ≥ 0 up to rounding
        var_ortho = float(ortho.sum()) / (b - 1)
        theta_norm = math.sqrt(var_norm / (b * g2))
        theta_inner = math.sqrt(var_inner / (b * g2 * g2))
        nu = math.sqrt(var_ortho / (b * g2))
    else:
        var_ortho = theta_norm = theta_inner = nu = math.nan
    return GradientTests(
        norm_test=theta_norm,
        inner_product_test=theta_inner,
        orthogonality_test=nu,
        var_norm=var_norm,
        var_inner=var_inner,
        var_ortho=var_ortho,
        grad_sq=g2,
        n=b,
        resolution=resolution,
    )
