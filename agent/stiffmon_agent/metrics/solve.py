r"""The eigen-solve of :func:`~stiffmon_agent.metrics.sharpness.hessian_eigen` on a given H v.

Top-k of H, or of D (H + S) D with D = P^{-1/2} (the same eigenvalues as P⁻¹(H + S)), by
Lanczos (warm result checked cold below ``check_below``) or power iteration, with the optional
extra symmetry check; shared by the full and the row-restricted measurement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

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
    """Top-k of H (``hv``) or of D (H + S) D with D = P^{-1/2} (see :func:`hessian_eigen`)."""
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
