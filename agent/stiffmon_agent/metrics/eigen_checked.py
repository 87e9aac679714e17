r"""A warm-started Lanczos result checked by a cold start when it looks wrong.

A warm start (:func:`~stiffmon_agent.metrics.eigen.lanczos` from the previous measurement's Ritz
vectors) finds an eigenvector its start block holds in part, not one it lacks: a direction whose
curvature rose past the old top between two measurements is missed, and the result, converged
on a lower eigenvalue, looks right (on an AdamW MLP a warm start stopped on λ2 = 102.0 with
λ1 = 109.8, the old top direction having dropped from 232). :func:`checked_lanczos` runs a cold
start from random vectors as well when the warm θ1 is below ``check_below`` (the caller's
expectation: a big drop from the last λ1, or every n-th measurement). Both θ1 are lower bounds
of λ1 (interlacing: θ1 ≤ λ1 on any subspace), so the larger one's result is the better; the
products of both are counted. The cold start's symmetry check (free: its random start block)
goes on the result.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from stiffmon_agent.metrics.eigen import EigenResult, MatVec, lanczos

__all__ = ["checked_lanczos"]


def checked_lanczos(
    matvec: MatVec,
    dim: int,
    k: int = 1,
    *,
    init: Tensor | None = None,
    check_below: float | None = None,
    tol: float = 1e-2,
    max_matvecs: int = 100,
    like: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """:func:`~stiffmon_agent.metrics.eigen.lanczos`, a warm result whose θ1 is below
    ``check_below`` (``math.inf``: any; None: none) checked by a cold start with the rest of the
    budget (``cold_checked`` on the result).

    Args:
        matvec: v ↦ A v.
        dim: Operator dimension P.
        k: Number of eigenpairs.
        init: Warm start (the previous result's ``warm_start``); None: cold, nothing to check.
        check_below: θ1 below which a warm result is checked.
        tol: Relative tolerance (see :func:`~stiffmon_agent.metrics.eigen.lanczos`).
        max_matvecs: Budget of products for both runs together.
        like: Tensor giving dtype and device.
        generator: Random generator for the cold start.
    """
    res = lanczos(
        matvec, dim, k, init=init, tol=tol, max_matvecs=max_matvecs, like=like, generator=generator
    )
    warm = init is not None and init.numel() > 0 and init.shape[0] == dim
    top = float(res.eigenvalues[0]) if res.eigenvalues.numel() else float("nan")
    if not warm or check_below is None or top >= check_below or res.matvecs >= max_matvecs:
        return res
    if res.nonfinite:  # nothing to check against
        return res
    cold = lanczos(
        matvec,
        dim,
        k,
        tol=tol,
        max_matvecs=max_matvecs - res.matvecs,
        like=like,
        generator=generator,
    )
    higher = cold.eigenvalues.numel() > 0 and not float(cold.eigenvalues[0]) <= top
    best = cold if higher else res
    return replace(
        best,
        matvecs=res.matvecs + cold.matvecs,
        cold_checked=True,
        nonfinite=cold.nonfinite,
        symmetry=cold.symmetry,
        lowest=min((v for v in (res.lowest, cold.lowest) if v == v), default=best.lowest),
    )
