r"""The eigen-solve of :func:`~stiffmon_agent.metrics.sharpness.hessian_eigen` on a given H v.

Top-k of H, or of D (H + S) D with D = P^{-1/2} (the same eigenvalues as P⁻¹(H + S)), by
Lanczos (warm result checked cold below ``check_below``) or power iteration, with the optional
extra symmetry check; shared by the full and the row-restricted measurement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from stiffmon_agent.metrics.eigen import EigenResult, power_iteration
from stiffmon_agent.metrics.eigen_checked import checked_lanczos
from stiffmon_agent.metrics.restricted import shift_diagonal
from stiffmon_agent.metrics.symmetry import check_symmetry

__all__ = ["solve_operator"]


def solve_operator(
    hv: Callable[[Tensor], Tensor],
    dim: int,
    like: Tensor,
    preconditioner: Tensor | None,
    shift: Tensor | None,
    *,
    k: int,
    method: str,
    check_below: float | None,
    symmetry_check: bool,
    **kw: Any,
) -> EigenResult:
    """Top-k of H (``hv``) or of D (H + S) D with D = P^{-1/2} (see :func:`hessian_eigen`).

    Weights in bfloat16 or float16 give products in that dtype; the Lanczos (or power)
    recurrence, its reorthogonalisation and the preconditioning then run in float32, each
    product taking its vector cast down and giving it back cast up: in bfloat16 throughout, the
    recurrence lost orthogonality and a warm-started solve of a small MLP gave λ1_H 4.22 against
    0.846 (above λ_max, which no Rayleigh quotient reaches in exact arithmetic).
    """
    if like.dtype in (torch.bfloat16, torch.float16):
        low, raw = like.dtype, hv
        like = like.float()
        if kw.get("init") is not None:
            kw["init"] = kw["init"].float()

        def hv(v: Tensor) -> Tensor:
            return raw(v.to(low)).float()

    matvec = hv
    if preconditioner is not None:
        d = preconditioner.detach().to(like).rsqrt()
        s2 = shift_diagonal(preconditioner, shift, like)

        def matvec(v: Tensor) -> Tensor:
            out = d * hv(d * v)
            return out if s2 is None else out + s2 * v

    kw["like"] = like
    if method == "power":
        res = power_iteration(matvec, dim, k, **kw)
    else:
        res = checked_lanczos(matvec, dim, k, check_below=check_below, **kw)
    if not symmetry_check or res.symmetry is not None or res.nonfinite:
        return res
    sym = check_symmetry(matvec, dim, like=like, generator=kw["generator"])
    return replace(res, matvecs=res.matvecs + sym.matvecs, symmetry=sym)
