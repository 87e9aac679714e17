"""Warm-started Lanczos along drifting spectra, against numpy's dense ``eigvalsh``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from stiffmon_agent.metrics import lanczos
from stiffmon_agent.metrics.eigen import _consistent_extrapolation, _extrapolated_error

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
    # both windows of 1 − 2^-m predict 1; θ3 of the tiny transformer (0.409 with a dense
    # Hessian): the last window predicts 0.346 (accepted alone), the one before 0.530
    assert _consistent_extrapolation([0.5, 0.75, 0.875, 0.9375], 1e-9) == pytest.approx(0.0625)
    assert _consistent_extrapolation([0.0647, 0.1977, 0.2927, 0.3268], 0.0232) == math.inf
    assert _consistent_extrapolation([0.75, 0.875, 0.9375], 1.0) == math.inf  # one window


def test_warm_sequence_on_a_drifting_spectrum() -> None:
    """λ1 well separated, eigenvectors turning: within 1 %, in few products (4.73 on average;
    4.00 before the extrapolated stop needed two consistent windows and the (k+1)-th pair)."""
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
    assert sum(counts) <= sum(plain), (counts, plain)
    assert sum(counts) / len(counts) <= 5.0, counts  # deterministic: seeds fixed


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


def risen_third(part: float) -> tuple[Tensor, Tensor, Tensor]:
    """(A, start block, top 3 of A by ``eigvalsh``): since the previous measurement v3 rose from
    the bulk (0.2) to 0.6, above v4 (0.5); spectrum 1, 0.8, 0.6, 0.5, 0.45, bulk ≤ 0.35.

    The start block is the previous matrix's top 4 eigenvectors: v1, v2, v4 (still exact
    eigenvectors of A) and x = √(1 − part²) v5 + part · v3.
    """
    gen = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen, dtype=torch.float64))
    bulk = 0.35 * torch.linspace(1.0, 0.0, DIM - 5, dtype=torch.float64) ** 2
    ev = torch.cat([torch.tensor([1.0, 0.8, 0.6, 0.5, 0.45], dtype=torch.float64), bulk])
    a = (q * ev) @ q.T
    c = math.sqrt(1.0 - part**2)
    x, x_low = c * q[:, 4] + part * q[:, 2], c * q[:, 2] - part * q[:, 4]
    prev_vecs = torch.stack([q[:, 0], q[:, 1], q[:, 3], x, x_low], dim=1)
    prev_ev = torch.tensor([1.0, 0.8, 0.5, 0.45, 0.2], dtype=torch.float64)
    prev = (prev_vecs * prev_ev) @ prev_vecs.T + (q[:, 5:] * bulk) @ q[:, 5:].T
    warm = torch.linalg.eigh(prev).eigenvectors.flip(1)[:, :4]
    ref = torch.from_numpy(np.linalg.eigvalsh(a.numpy())[::-1][:3].copy())
    return a, warm, ref


@pytest.mark.parametrize("part", [0.3, 0.5])
def test_warm_start_holding_part_of_the_new_third_eigenvector(part: float) -> None:
    """k = 3: stopping on the top 3 alone reports λ4 = 0.5 as λ3 with ``converged`` (residuals
    0); the (k+1)-th pair (x: θ ≈ 0.46, r ≈ 0.15 part) reaches above θ3, so its residual is
    expanded and v3 found."""
    a, warm, ref = risen_third(part)
    got = lanczos(lambda v: a @ v, DIM, k=3, init=warm, tol=1e-2)
    assert got.converged
    torch.testing.assert_close(got.eigenvalues, ref, rtol=0, atol=1e-2 * float(ref[0]))


def test_warm_start_lacking_an_eigenvector_entirely() -> None:
    """The limit stated by ``lanczos``: a start block orthogonal to v3 hides it from a warm
    start (θ3 = λ4, exact, ``converged``); a cold start finds it."""
    a, warm, ref = risen_third(0.0)
    got = lanczos(lambda v: a @ v, DIM, k=3, init=warm, tol=1e-2)
    assert got.converged and float(got.eigenvalues[2]) == pytest.approx(0.5)
    gen = torch.Generator().manual_seed(6)
    cold = lanczos(lambda v: a @ v, DIM, k=3, tol=1e-2, generator=gen)
    assert cold.converged
    torch.testing.assert_close(cold.eigenvalues, ref, rtol=0, atol=1e-2 * float(ref[0]))


def test_warm_k3_sequence_through_crossings_below_lambda2() -> None:
    """k = 3 along a drift where λ3 … λ5 cross (turning 0.4 rad per step): every converged top 3
    within 1 % of ``eigvalsh``. The old stop put θ3 next to λ4, 2.5 % and 5.3 % low at steps 6
    and 7: on the residual alone with the 4th pair unresolved, then on an extrapolated plateau."""
    steps = 8
    tops = [
        line(1.0, 0.95, steps),
        line(0.8, 0.9, steps),
        line(0.8, 0.7, steps),
        line(0.65, 0.75, steps),
        line(0.6, 0.7, steps),
    ]
    gen = torch.Generator().manual_seed(0)
    warm: Tensor | None = None
    for a, _ in drifting(tops, steps, 0.4, 235):
        got = lanczos(lambda v, a=a: a @ v, DIM, k=3, tol=1e-2, init=warm, generator=gen)
        assert got.converged
        ref = np.linalg.eigvalsh(a.numpy())[::-1][:3]
        np.testing.assert_allclose(got.eigenvalues.numpy(), ref, rtol=0, atol=1e-2 * ref[0])
        warm = got.warm_start
