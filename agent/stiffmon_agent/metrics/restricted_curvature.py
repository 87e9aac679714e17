r"""Hessian trace and spectral density on the embedding rows the probe touches, exactly.

With T the touched coordinates and U the untouched embedding rows (see
:mod:`~stiffmon_agent.metrics.restricted`), H = H_TT ⊕ 0_UU, so

* tr(H) = tr(H_TT): Hutchinson on the touched block estimates the same trace. A Rademacher
  sample over all P is zᵀHz = z_Tᵀ H_TT z_T, the touched block's sample for the same z_T, so
  the two estimators have the very same distribution (variance 2 Σ_{i≠j} H_ij², all of whose
  terms lie in T × T): the published standard error is that of the whole estimator, at |T|
  numbers per vector instead of P.
* The spectral density φ = (1/P) Σ_i δ(t − λ_i) of H is (|T|/P) φ_TT + (|U|/P) δ_0: SLQ on
  H_TT and an exact point mass at 0
  (:func:`~stiffmon_agent.metrics.density.with_zero_block`).

The restriction is the sharpness measurement's (:func:`~stiffmon_agent.metrics.sharpness.
hessian_eigen`): by default only where the untouched rows hold at least
:data:`~stiffmon_agent.metrics.restricted.RESTRICT_MIN` parameters, never with ``wrap``
(a sharded measurement: each process touches its own rows), and a table is kept whole where
the restriction would not be exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from stiffmon_agent.metrics.restricted import Restriction, restriction_for
from stiffmon_agent.metrics.sharpness import HessianOperator

__all__ = ["touched_operator"]


@contextmanager
def touched_operator(
    model: nn.Module,
    build: Callable[[], HessianOperator],
    *,
    restrict: bool | None = None,
    sharded: bool = False,
) -> Iterator[tuple[HessianOperator, Restriction | None]]:
    """The Hessian operator to measure: H_TT on the touched rows where restricted, else H.

    Args:
        model: The network (already in measurement mode).
        build: Makes the :class:`HessianOperator` of the probe objective (called once, and
            once more with the compact tables in place where restricted).
        restrict: None: where the untouched rows hold at least ``restricted.RESTRICT_MIN``
            parameters; True: wherever exact; False: never.
        sharded: The products are summed over processes (``wrap``): never restricted.

    Yields:
        ``(operator, restriction)``: restriction None where the operator is the whole H
        (its ``dim`` is P); else the operator is H_TT (``dim`` = |T|) and P = |T| +
        ``restriction.untouched``. The tables are restored on exit.
    """
    op = build()
    found = restriction_for(model, op, restrict, sharded)
    if found is None:
        yield op, None
        return
    with found.applied():
        yield build(), found
