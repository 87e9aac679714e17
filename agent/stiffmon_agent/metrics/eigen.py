r"""Top eigenpairs and traces of symmetric operators given only as matrix-vector products.

Pure linear algebra on a ``matvec: Tensor (P,) -> Tensor (P,)``; used with Hessian-vector
products for sharpness, but nothing here knows about models.

* :func:`lanczos`: Lanczos with full reorthogonalisation. After m products the Krylov basis Q_m
  and tridiagonal T_m = Q_mᵀ A Q_m give Ritz pairs (θ, Q_m s); the residual of each is
  ‖A y − θ y‖ = |β_m s_m|, and |θ − λ| ≤ that residual for some eigenvalue λ of A. It stops when
  the top-k residuals are ≤ ``tol`` · |θ_1|, so with ``tol = 1e-2`` each reported eigenvalue is
  within 1 % of an eigenvalue of A.
* :func:`power_iteration`: the method of PyHessian: v ← Av / ‖Av‖, λ = vᵀAv, stop when
  |λ − λ_prev| / |λ_prev| < ``tol``; further eigenpairs by orthogonalising against the found ones.
  It converges to the largest-magnitude eigenvalue.
* :func:`hutchinson_trace`: tr(A) ≈ mean of zᵀAz over Rademacher vectors z.

Both eigen-solvers are warm-startable from the previous eigenvectors: along a training run the
top eigenvectors move slowly, so the next measurement needs few products.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class EigenResult:
    """Top eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: (k,) largest first.
        eigenvectors: (P, k) unit columns, for warm-starting the next measurement.
        matvecs: Matrix-vector products used.
        converged: Whether the tolerance was met within the product budget.
        residuals: (k,) ‖A y − θ y‖ of each pair (Lanczos) or relative change (power).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    matvecs: int
    converged: bool
    residuals: Tensor


def _random_unit(dim: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    v = torch.randn(dim, generator=generator, dtype=like.dtype, device="cpu").to(like.device)
    return v / v.norm()


def _start_vector(
    dim: int, init: Tensor | None, like: Tensor, generator: torch.Generator | None
) -> Tensor:
    if init is not None and init.numel() and init.shape[0] == dim:
        cols = init.reshape(dim, -1).to(like)
        v = (cols / cols.norm(dim=0).clamp_min(1e-300)).sum(dim=1)
        if torch.isfinite(v).all() and float(v.norm()) > 0:
            return v / v.norm()
    return _random_unit(dim, like, generator)


def lanczos(
    matvec: MatVec,
    dim: int,
    k: int = 1,
    *,
    init: Tensor | None = None,
    tol: float = 1e-2,
    max_matvecs: int = 100,
    like: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """Top-k (largest algebraic) eigenpairs of a symmetric operator by Lanczos.

    Args:
        matvec: v ↦ A v for v of shape (dim,).
        dim: Operator dimension P.
        k: Number of eigenpairs.
        init: Warm start: previous eigenvectors (P,) or (P, m); their normalised sum starts the
            Krylov space. None (or a shape mismatch): a random start.
        tol: Stop when every top-k residual ‖A y − θ y‖ ≤ tol · |θ_1|.
        max_matvecs: Budget of products.
        like: Tensor giving dtype and device (default float64 CPU).
        generator: Random generator for start / restart vectors (the global RNG is not touched).
    """
    like = like if like is not None else torch.zeros((), dtype=torch.float64)
    k = max(1, min(k, dim))
    q = _start_vector(dim, init, like, generator)
    basis: list[Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples q_j and q_{j+1}; 0 where the space restarted
    beta = 0.0
    theta = torch.zeros(0, dtype=torch.float64)
    s = torch.zeros(0, 0, dtype=torch.float64)
    residuals = torch.full((k,), float("inf"), dtype=torch.float64)
    converged = False
    matvecs = 0
    while matvecs < max_matvecs and len(basis) < dim:
        basis.append(q)
        w = matvec(q)
        matvecs += 1
        alpha = float(q @ w)
        alphas.append(alpha)
        w = w - alpha * q
        if len(basis) > 1:
            w = w - betas[-1] * basis[-2]
        qm = torch.stack(basis, dim=1)
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - qm @ (qm.T @ w)
        beta = float(w.norm())
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = torch.linalg.eigh(t)
        theta, s = theta.flip(0), s.flip(1)
        top = min(k, len(alphas))
        residuals = (beta * s[-1, :top]).abs()
        scale = max(abs(float(theta[0])), 1e-300)
        invariant = beta <= 1e-12 * scale
        if invariant and k > 1 and len(basis) < dim and matvecs < max_matvecs:
            # An invariant Krylov subspace holds one vector per distinct eigenvalue: restart
            # orthogonally so that repeated eigenvalues among the top k are not missed.
            q = _random_unit(dim, like, generator)
            for _ in range(2):
                q = q - qm @ (qm.T @ q)
            q = q / q.norm()
            betas.append(0.0)
            continue
        if top == k and bool((residuals <= tol * scale).all()):
            converged = True
            break
        if invariant:
            converged = top == k
            break
        betas.append(beta)
        q = w / beta
    top = min(k, len(alphas))
    vecs = torch.stack(basis, dim=1) @ s[:, :top].to(like)
    return EigenResult(
        eigenvalues=theta[:top].to(like),
        eigenvectors=vecs / vecs.norm(dim=0).clamp_min(1e-300),
        matvecs=matvecs,
        converged=converged,
        residuals=residuals[:top],
    )


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
            v = v / v.norm().clamp_min(1e-300)
            hv = matvec(v)
            matvecs += 1
            lam = float(hv @ v)
            if lam_prev is not None:
                change = abs(lam - lam_prev) / (abs(lam_prev) + 1e-12)
                if change < tol:
                    done = True
                    break
            lam_prev = lam
            v = hv
        converged &= done
        vals.append(lam)
        vecs.append(v / v.norm().clamp_min(1e-300))
        changes.append(change)
        if not done:
            break
    order = sorted(range(len(vals)), key=lambda j: -vals[j])
    return EigenResult(
        eigenvalues=torch.tensor([vals[j] for j in order], dtype=like.dtype, device=like.device),
        eigenvectors=torch.stack([vecs[j] for j in order], dim=1),
        matvecs=matvecs,
        converged=converged,
        residuals=torch.tensor([changes[j] for j in order], dtype=torch.float64),
    )


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
