"""Top eigenpairs by power iteration with deflation: the method of PyHessian, for comparison
with :func:`~stiffmon_agent.metrics.eigen.lanczos` (imported there too). It converges to the
largest-magnitude eigenvalue: at a saddle whose most negative eigenvalue dominates, that one,
not λ1."""

from __future__ import annotations

import torch
from torch import Tensor

from stiffmon_agent.metrics.eigen import EigenResult, _norm
from stiffmon_agent.metrics.symmetry import MatVec
from stiffmon_agent.metrics.symmetry import random_unit as _random_unit

__all__ = ["power_iteration"]


def power_iteration(
    matvec: MatVec,
    dim: int,
    k: int = 1,
    *,
    init: Tensor | None = None,
    tol: float = 1e-3,
    max_matvecs: int = 100,
    like: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """Top-k eigenpairs by power iteration with deflation (PyHessian's method).

    Args:
        matvec: v ↦ A v.
        dim: Operator dimension P.
        k: Number of eigenpairs, found one after another.
        init: Warm start: previous eigenvectors (P, m); column i starts eigenpair i.
        tol: Relative change of the eigenvalue estimate that stops an eigenpair.
        max_matvecs: Budget of products over all k eigenpairs.
        like: Tensor giving dtype and device.
        generator: Random generator for cold starts.
    """
    like = like if like is not None else torch.zeros((), dtype=torch.float64)
    k = max(1, min(k, dim))
    cols = (
        init.reshape(dim, -1)
        if init is not None and init.numel() and init.shape[0] == dim
        else None
    )
    vals: list[float] = []
    vecs: list[Tensor] = []
    changes: list[float] = []
    matvecs = 0
    converged = True
    for i in range(k):
        v = (
            cols[:, i].to(like)
            if cols is not None and i < cols.shape[1]
            else _random_unit(dim, like, generator)
        )
        lam_prev: float | None = None
        lam, change, done = 0.0, float("inf"), False
        while matvecs < max_matvecs:
            for u in vecs:
                v = v - (u @ v) * u
            v = v / _norm(v).clamp_min(1e-300).to(v)
            hv = matvec(v)
            matvecs += 1
            lam = float(hv @ v)
            if lam_prev is not None:
                change = abs(lam - lam_prev) / max(abs(lam_prev), 1e-300)  # relative at any scale
                if change < tol:
                    done = True
                    break
            lam_prev = lam
            v = hv
        converged &= done
        vals.append(lam)
        vecs.append(v / _norm(v).clamp_min(1e-300).to(v))
        changes.append(change)
        if not done:
            break
    order = sorted(range(len(vals)), key=lambda j: -vals[j])
    eigenvectors = torch.stack([vecs[j] for j in order], dim=1)
    return EigenResult(
        eigenvalues=torch.tensor([vals[j] for j in order], dtype=like.dtype, device=like.device),
        eigenvectors=eigenvectors,
        matvecs=matvecs,
        converged=converged,
        residuals=torch.tensor([changes[j] for j in order], dtype=torch.float64),
        warm_start=eigenvectors,
    )
