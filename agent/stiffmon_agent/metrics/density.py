r"""Hessian trace and spectral density from matrix-vector products (PyHessian's instruments).

Pure linear algebra on a ``matvec: Tensor (P,) -> Tensor (P,)`` of a symmetric operator A (the
Hessian of the mean probe loss in the agent); nothing here knows about models.

* **Hutchinson trace**: tr(A) = E[zᵀAz] for Rademacher z (entries ±1, E zzᵀ = I); the mean of m
  samples is unbiased with standard error s/√m (s the sample standard deviation).
* **Stochastic Lanczos quadrature** (SLQ; Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019;
  PyHessian): the spectral density φ(t) = (1/P) Σ_i δ(t − λ_i) satisfies, for a unit start vector
  q with E[q qᵀ] = I/P, ∫ f dφ = tr f(A)/P = E[qᵀ f(A) q]. m Lanczos steps from q give the
  tridiagonal T_m = Σ_k θ_k s_k s_kᵀ, and qᵀ f(A) q ≈ Σ_k w_k f(θ_k) with Ritz values θ_k and
  weights w_k = (e_1ᵀ s_k)² = (qᵀ y_k)² (Σ w_k = 1): the m-point Gauss quadrature of the measure
  Σ_i (qᵀu_i)² δ(t − λ_i), exact for polynomials f of degree ≤ 2m − 1. So per run
  Σ_k w_k θ_k = qᵀAq and Σ_k w_k θ_k² = qᵀA²q exactly, and their means over runs estimate
  tr(A)/P and tr(A²)/P without bias. The density is the average over R runs of the Gaussian
  broadening Σ_k w_k N(t; θ_k, σ²) on a grid (PyHessian: R = ``n_v``, m = ``iter``).
* Sharing products: with a Rademacher start q = z/√P, the first Lanczos coefficient
  α_1 = qᵀAq = zᵀAz / P, so every SLQ run *is* a Hutchinson sample P Σ_k w_k θ_k; the trace comes
  with the density at no extra product (:func:`spectral_density` pools them with any extra
  single-product samples).

The Lanczos iteration (:func:`lanczos_quadrature`) is the three-term recurrence with full
reorthogonalisation (twice, against a preallocated basis) run for exactly ``steps`` products; the
nodes and weights come from the m×m tridiagonal alone (w_k = (e_1ᵀ s_k)²), so no P×m Ritz vectors
are formed. :func:`stiffmon_agent.metrics.eigen.lanczos` computes the same Ritz values but checks
convergence and rebuilds its basis at every step (O(m² P) copying), which is right for a few top
eigenpairs and too slow for 100-step quadratures at P ~ 10⁵; the tests check the two agree. The
Ritz values lie in
[λ_min, λ_max] and the extreme ones converge first, so the grid, padded by a few σ beyond the
extreme Ritz values, covers the spectrum's support once ``steps`` is moderate.

* **A zero block** (:func:`with_zero_block`): for A = A_TT ⊕ 0_UU (the Hessian with embedding
  rows the probe never touches, :mod:`~stiffmon_agent.metrics.restricted`) the density is
  exactly φ = (|T|/P) φ_TT + (|U|/P) δ_0, so SLQ runs on A_TT (vectors of |T| numbers) and the
  point mass at 0 is added exactly (:attr:`SpectralDensity.zero_mass`): every moment
  ∫ t^k dφ = (|T|/P) ∫ t^k dφ_TT (k ≥ 1; 1 for k = 0) and the trace tr(A) = tr(A_TT) are those
  of A. A Rademacher z over all P gives zᵀAz = z_Tᵀ A_TT z_T, so the trace samples have the very
  same distribution (same variance, the published stderr stays that of the whole operator's
  estimator); what the restriction gains is memory, time, and the m Gauss nodes all spent on
  φ_TT instead of partly on resolving the atom at 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from stiffmon_agent.metrics.eigen import MatVec, TraceEstimate


def rademacher(dim: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A vector of independent ±1 entries (drawn on the CPU, so seeded runs match anywhere)."""
    z = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int8)
    return (z.to(like.dtype) * 2 - 1).to(like.device)


def trace_from_samples(samples: Sequence[float]) -> TraceEstimate:
    """Mean and standard error of Hutchinson samples zᵀAz (stderr NaN for one sample)."""
    m = len(samples)
    if m < 1:
        raise ValueError("need at least one trace sample")
    mean = math.fsum(samples) / m
    if m < 2:
        return TraceEstimate(mean=mean, stderr=math.nan, samples=1)
    var = math.fsum((s - mean) ** 2 for s in samples) / (m - 1)
    return TraceEstimate(mean=mean, stderr=math.sqrt(var / m), samples=m)


def hutchinson_samples(
    matvec: MatVec,
    dim: int,
    samples: int,
    *,
    like: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[float]:
    """``samples`` independent zᵀAz with Rademacher z (one product each)."""
    like = like if like is not None else torch.zeros((), dtype=torch.float64)
    out = []
    for _ in range(samples):
        z = rademacher(dim, like, generator)
        out.append(float(z.double() @ matvec(z).double()))
    return out


@dataclass(frozen=True)
class SpectralDensity:
    """The result of stochastic Lanczos quadrature.

    Attributes:
        nodes: (R, m) Ritz values θ_k of each run (ascending).
        weights: (R, m) Gauss weights w_k = (qᵀy_k)² of each run; each row sums to 1.
        trace: Hutchinson estimate of tr(A) from the runs' starts and any extra samples.
        matvecs: Products used in all.
        dim: Operator dimension P.
        zero_mass: Weight |U|/P of an exact point mass at 0 (a zero block A = A_TT ⊕ 0_UU,
            :func:`with_zero_block`); the rows of ``weights`` then sum to 1 − ``zero_mass``.
        solved_dim: Dimension of the block SLQ ran on (|T|; P without a zero block).
    """

    nodes: Tensor
    weights: Tensor
    trace: TraceEstimate
    matvecs: int
    dim: int
    zero_mass: float = 0.0
    solved_dim: int | None = None

    @property
    def runs(self) -> int:
        return int(self.nodes.shape[0])

    @property
    def steps(self) -> int:
        return int(self.nodes.shape[1])

    def moment(self, k: int) -> Tensor:
        """Per-run quadrature Σ_j w_j θ_j^k (+ the point mass at 0: ``zero_mass`` · 0^k)
        (R,); its mean estimates tr(A^k)/P."""
        atom = self.zero_mass if k == 0 else 0.0
        return (self.weights * self.nodes**k).sum(dim=1) + atom

    def support(self) -> tuple[float, float]:
        """The extreme Ritz values, with the exact eigenvalue 0 of a zero block."""
        lo, hi = float(self.nodes.min()), float(self.nodes.max())
        return (min(lo, 0.0), max(hi, 0.0)) if self.zero_mass > 0 else (lo, hi)

    def default_sigma(self, relative: float = 0.01) -> float:
        """A broadening of ``relative`` × the spread of the Ritz values (1e-12 if they agree)."""
        lo, hi = self.support() if self.nodes.numel() else (0.0, 0.0)
        return max(relative * (hi - lo), 1e-12)

    def broadened(
        self, points: int = 256, sigma: float | None = None, pad: float = 4.0
    ) -> tuple[Tensor, Tensor, float]:
        """The density on a grid: mean over runs of Σ_k w_k N(t; θ_k, σ²) (+ ``zero_mass`` ·
        N(t; 0, σ²)).

        Args:
            points: Grid size (≥ 2).
            sigma: Gaussian standard deviation σ; default :meth:`default_sigma`.
            pad: The grid spans [min θ − pad σ, max θ + pad σ].

        Returns:
            ``(grid, density, sigma)``: the density integrates to 1 up to the Gaussian tails
            beyond the grid (≈ 6e-5 at ``pad = 4``); it is not renormalised, so its mean is
            exactly the quadrature mean up to those tails and its variance that plus σ².
        """
        if points < 2:
            raise ValueError("the grid needs at least 2 points")
        s = self.default_sigma() if sigma is None else float(sigma)
        if not s > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        lo, hi = self.support()
        grid = torch.linspace(lo - pad * s, hi + pad * s, points, dtype=torch.float64)
        nodes = self.nodes.reshape(-1, 1)
        w = self.weights.reshape(-1, 1) / self.runs
        if self.zero_mass > 0:
            nodes = torch.cat([nodes, nodes.new_zeros(1, 1)])
            w = torch.cat([w, w.new_full((1, 1), self.zero_mass)])
        z = (grid.reshape(1, -1) - nodes) / s
        density = (w * torch.exp(-0.5 * z * z)).sum(dim=0) / (s * math.sqrt(2.0 * math.pi))
        return grid, density, s


def lanczos_quadrature(matvec: MatVec, q: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Gauss quadrature nodes and weights of the spectral measure of A seen from unit ``q``.

    ``steps`` Lanczos steps with full reorthogonalisation build T_m = tridiag(β, α, β);
    T_m = S diag(θ) Sᵀ gives nodes θ_k and weights w_k = S_{1k}². If the Krylov space becomes
    invariant after j < m steps (β_j ≈ 0) the quadrature is already exact: the remaining m − j
    nodes repeat the last one with weight 0.

    Args:
        matvec: v ↦ A v for a symmetric A.
        q: Unit start vector (P,); its dtype and device are used throughout.
        steps: m ≥ 1 (at most P).

    Returns:
        ``(nodes, weights)``, float64 (m,), nodes ascending, weights summing to 1.
    """
    dim = q.shape[0]
    m = max(1, min(steps, dim))
    basis = torch.empty((m, dim), dtype=q.dtype, device=q.device)
    basis[0] = q
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(m):
        w = matvec(basis[j]).to(q.dtype)
        alpha = float(basis[j] @ w)
        alphas.append(alpha)
        w = w - alpha * basis[j]
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        done = basis[: j + 1]
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - done.T @ (done @ w)
        beta = float(w.norm())
        scale = max(max(abs(a) for a in alphas), max(betas, default=0.0), 1e-300)
        if j == m - 1 or beta <= 1e-10 * scale:
            break
        betas.append(beta)
        basis[j + 1] = w / beta
    k = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    theta, s = torch.linalg.eigh(t)
    w = s[0] ** 2
    if k < m:
        theta = torch.cat([theta, theta[-1:].expand(m - k)])
        w = torch.cat([w, torch.zeros(m - k, dtype=torch.float64)])
    order = torch.argsort(theta)
    return theta[order], w[order] / w.sum()


def spectral_density(
    matvec: MatVec,
    dim: int,
    *,
    runs: int = 1,
    steps: int = 100,
    trace_samples: int = 0,
    like: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature with Rademacher starts, and the Hutchinson trace with it.

    Args:
        matvec: v ↦ A v for a symmetric A.
        dim: P.
        runs: Independent Lanczos runs R (PyHessian's ``n_v``; ≥ 1).
        steps: Lanczos steps m per run (PyHessian's ``iter``); capped at P.
        trace_samples: Extra single-product Hutchinson samples pooled with the R free ones.
        like: Tensor giving dtype and device of the vectors (default float64 CPU).
        generator: Random generator for the start vectors (the global RNG is not touched).

    Returns:
        Ritz values and weights of every run, the trace estimate, and the product count.
    """
    if runs < 1 or steps < 1 or trace_samples < 0:
        raise ValueError(
            f"need runs ≥ 1, steps ≥ 1, trace_samples ≥ 0; got {runs}, {steps}, {trace_samples}"
        )
    like = like if like is not None else torch.zeros((), dtype=torch.float64)
    nodes, weights, samples = [], [], []
    matvecs = 0
    for _ in range(runs):
        counted = _Counted(matvec)
        q = rademacher(dim, like, generator) / math.sqrt(dim)
        theta, w = lanczos_quadrature(counted, q, steps)
        matvecs += counted.calls
        nodes.append(theta)
        weights.append(w)
        samples.append(dim * float((w * theta).sum()))  # = zᵀAz: a Hutchinson sample
    samples += hutchinson_samples(matvec, dim, trace_samples, like=like, generator=generator)
    matvecs += trace_samples
    return SpectralDensity(
        nodes=torch.stack(nodes),
        weights=torch.stack(weights),
        trace=trace_from_samples(samples),
        matvecs=matvecs,
        dim=dim,
    )


def with_zero_block(res: SpectralDensity, dim: int) -> SpectralDensity:
    """The density of A = A_TT ⊕ 0 (``dim`` = P ≥ |T|) from SLQ on A_TT (``res``):
    φ = (|T|/P) φ_TT + ((P − |T|)/P) δ_0, exactly (weights scaled, the point mass at 0 in
    ``zero_mass``); the trace is unchanged (tr A = tr A_TT)."""
    if dim < res.dim:
        raise ValueError(f"the whole operator ({dim}) is smaller than its block ({res.dim})")
    if dim == res.dim:
        return res
    return SpectralDensity(
        nodes=res.nodes,
        weights=res.weights * (res.dim / dim),
        trace=res.trace,
        matvecs=res.matvecs,
        dim=dim,
        zero_mass=(dim - res.dim) / dim,
        solved_dim=res.dim,
    )


class _Counted:
    """A matvec that counts its calls."""

    def __init__(self, matvec: MatVec) -> None:
        self.matvec = matvec
        self.calls = 0

    def __call__(self, v: Tensor) -> Tensor:
        self.calls += 1
        return self.matvec(v)
