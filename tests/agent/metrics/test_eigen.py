"""Warm-started Lanczos along drifting spectra, against numpy's dense ``eigvalsh``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from stiffmon_agent.metrics import lanczos
from stiffmon_agent.metrics.eigen import _extrapolated_error

DIM = 300
ROT = 60  # directions turned by the drift
BULK = 0.7  # top of the bulk


def drifting(
    top: list[Tensor], steps: int, rotation: float, seed: int
) -> list[tuple[Tensor, float]]:
    """Symmetric matrices A_t = Q_t diag(λ_t) Q_tᵀ with a Hessian-like spectrum.

    λ_t = (top[0][t], top[1][t], …, then a bulk decaying from 0.55 to 0); Q_t = Q_0 R_t with
    R_t = exp(t S) turning the first 24 directions (the top ones and some of the bulk) into
    each other by about ``rotation`` radians per step (S skew-symmetric, random). Returns
    (A_t, λ1 of A_t by ``numpy.linalg.eigvalsh``).
    """
    gen = torch.Generator().manual_seed(seed)
    q0, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen, dtype=torch.float64))
    g = torch.randn(ROT, ROT, generator=gen, dtype=torch.float64)
    skew = (g - g.T) / math.sqrt(2 * ROT)
    n = DIM - len(top)
    bulk = BULK * torch.linspace(1.0, 0.0, n, dtype=torch.float64) ** 2
    out = []
    for t in range(steps):
        r = torch.eye(DIM, dtype=torch.float64)
        r[:ROT, :ROT] = torch.linalg.matrix_exp(t * rotation * skew)
        q = q0 @ r
        ev = torch.cat([torch.stack([lam[t] for lam in top]), bulk])
        a = (q * ev) @ q.T
        a = (a + a.T) / 2
        out.append((a, float(np.linalg.eigvalsh(a.numpy())[-1])))
    return out


def warm_run(
    mats: list[tuple[Tensor, float]], *, use_block: bool = True, extrapolate: bool = True
) -> tuple[list[float], list[int]]:
    """Relative errors of λ1 and products of each measurement after the (cold) first."""
    gen = torch.Generator().manual_seed(0)
    warm: Tensor | None = None
    errs, counts = [], []
    for i, (a, lam1) in enumerate(mats):
        got = lanczos(
            lambda v, a=a: a @ v,
            DIM,
            tol=1e-2,
            init=warm,
            generator=gen,
            extrapolate=extrapolate,
        )
        assert got.converged
        warm = got.warm_start if use_block else got.eigenvectors
        if i:
            errs.append(abs(float(got.eigenvalues[0]) - lam1) / lam1)
            counts.append(got.matvecs)
    return errs, counts


def line(a: float, b: float, steps: int) -> Tensor:
    return torch.linspace(a, b, steps, dtype=torch.float64)


def test_extrapolated_error_is_exact_on_a_geometric_sequence() -> None:
    # θ_m = 1 − 2^-m: increases 1/2, 1/4, … ; after 1 − 1/8 the rest sums to 1/8
    assert _extrapolated_error([0.5, 0.75, 0.875]) == pytest.approx(0.125)
    assert _extrapolated_error([0.5, 0.75]) == math.inf  # one increase: no ratio yet
    assert _extrapolated_error([0.5, 0.6, 0.8]) == math.inf  # increases do not shrink
    assert _extrapolated_error([0.5, 0.7, 0.7]) == math.inf  # a stall is no evidence


def test_warm_sequence_on_a_drifting_spectrum() -> None:
    """λ1 well separated, eigenvectors turning: within 1 %, in few products."""
    steps = 12
    tops = [
        line(1.0, 1.3, steps),
        line(0.8, 1.1, steps),
        line(0.7, 0.9, steps),
        line(0.6, 0.7, steps),
    ]
    mats = drifting(tops, steps, 0.8, 1)
    errs, counts = warm_run(mats)
    assert max(errs) <= 1e-2, errs
    _, plain = warm_run(mats, extrapolate=False)  # the residual rule alone
    assert sum(counts) < sum(plain), (counts, plain)
    assert sum(counts) / len(counts) <= 4.5, counts  # deterministic: seeds fixed


@pytest.mark.parametrize("rotation", [0.0, 0.3])
def test_warm_sequence_where_lambda1_and_lambda2_cross(rotation: float) -> None:
    """λ1 and λ2 swap places mid-run (5 % apart at either end); the top one is returned.

    With no rotation the previous top eigenvector is (nearly) an exact eigenvector of the next
    matrix, for the eigenvalue that became λ2: a warm start from it alone stops on λ2, the
    start block with the extra Ritz vector does not.
    """
    steps = 10
    tops = [line(1.0, 0.95, steps), line(0.95, 1.0, steps), line(0.8, 0.85, steps)]
    mats = drifting([*tops, line(0.6, 0.7, steps)], steps, rotation, 2)
    errs, _ = warm_run(mats)
    assert max(errs) <= 1e-2, errs
    if rotation == 0.0:
        single, _ = warm_run(mats, use_block=False)
        assert max(single) > 1e-2, single  # the test can fail: the single vector misses λ1


def test_warm_sequence_near_degenerate_top_pair() -> None:
    """λ1 ≈ λ2 (0.3 % apart, turning): either is within tolerance of λ1."""
    steps = 10
    tops = [line(1.0, 1.2, steps), line(0.997, 1.196, steps), line(0.8, 0.9, steps)]
    mats = drifting([*tops, line(0.6, 0.7, steps)], steps, 0.5, 3)
    errs, _ = warm_run(mats)
    assert max(errs) <= 1e-2, errs


def test_warm_start_with_k_eigenpairs() -> None:
    """k = 2 along a drift: both eigenvalues within 1 % of eigvalsh's top two."""
    steps = 8
    tops = [line(1.3, 1.5, steps), line(1.0, 1.15, steps), line(0.8, 0.9, steps)]
    mats = drifting([*tops, line(0.6, 0.7, steps)], steps, 0.3, 4)
    warm: Tensor | None = None
    for a, _ in mats:
        got = lanczos(lambda v, a=a: a @ v, DIM, k=2, tol=1e-2, init=warm)
        assert got.converged and got.warm_start.shape == (DIM, 3)
        ref = np.linalg.eigvalsh(a.numpy())[::-1][:2]
        np.testing.assert_allclose(got.eigenvalues.numpy(), ref, rtol=1e-2)
        warm = got.warm_start
