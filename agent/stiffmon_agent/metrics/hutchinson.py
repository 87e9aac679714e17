r"""Hutchinson's trace estimator: tr(A) ≈ (1/m) Σ z_iᵀ A z_i over Rademacher vectors z_i.

Unbiased (E[z zᵀ] = I), variance 2 Σ_{i≠j} A_ij² / m; pure linear algebra on a ``matvec``.
For A = A_TT ⊕ 0 (embedding rows a probe never touches) zᵀAz = z_Tᵀ A_TT z_T, so the estimator
on the block A_TT (:mod:`~stiffmon_agent.metrics.restricted_curvature`) is the same estimator,
variance included, with vectors of |T| numbers instead of P.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from stiffmon_agent.metrics.symmetry import MatVec

__all__ = ["TraceEstimate", "hutchinson_trace"]


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson trace estimate: ``mean`` ± ``stderr`` from ``samples`` products."""

    mean: float
    stderr: float
    samples: int


def hutchinson_trace(
    matvec: MatVec,
    dim: int,
    samples: int = 20,
    *,
    like: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> TraceEstimate:
    """tr(A) ≈ (1/m) Σ z_iᵀ A z_i with Rademacher z_i (entries ±1), unbiased.

    Args:
        matvec: v ↦ A v.
        dim: Operator dimension.
        samples: Number m of probe vectors (≥ 1).
        like: Tensor giving dtype and device.
        generator: Random generator for the probe vectors.
    """
    if samples < 1:
        raise ValueError("samples must be at least 1")
    like = like if like is not None else torch.zeros((), dtype=torch.float64)
    vals = []
    for _ in range(samples):
        z = torch.randint(0, 2, (dim,), generator=generator).to(like) * 2 - 1
        vals.append(float(z @ matvec(z)))
    mean = sum(vals) / samples
    var = sum((v - mean) ** 2 for v in vals) / (samples - 1) if samples > 1 else float("nan")
    return TraceEstimate(mean=mean, stderr=math.sqrt(var / samples), samples=samples)
