r"""Whether an operator given as matrix-vector products is symmetric: vᵀAw = wᵀAv.

Every eigen-solver of :mod:`.eigen` assumes a symmetric A, and a Hessian-vector product is
symmetric unless a layer's second derivative is computed wrongly (torch's ``_weight_norm``).
:func:`check_symmetry` measures the defect from two random products, or from products a solver
computed anyway (a cold Lanczos start block), against what rounding explains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


def random_unit(dim: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """A random unit vector of ``dim`` entries, dtype and device of ``like``."""
    v = torch.randn(dim, generator=generator, dtype=like.dtype, device="cpu").to(like.device)
    return v / v.norm()


@dataclass(frozen=True)
class SymmetryCheck:
    r"""Whether vᵀAw = wᵀAv for random vectors v, w (see :func:`check_symmetry`).

    Attributes:
        defect: √P |vᵀAw − wᵀAv| / (‖v‖‖Aw‖ + ‖w‖‖Av‖), the largest over the pairs checked
            (NaN if a product was not finite).
        tolerance: The largest defect rounding explains (:func:`symmetry_tolerance`).
        matvecs: Products computed for the check (0 where the solver's own were reused).
    """

    defect: float
    tolerance: float
    matvecs: int

    @property
    def symmetric(self) -> bool | None:
        """False on a clear asymmetry (defect > tolerance), None where it is unknown (NaN)."""
        if math.isnan(self.defect):
            return None
        return self.defect <= self.tolerance


# Largest symmetry defect (see :func:`check_symmetry`) that rounding explains, by dtype.
SYMMETRY_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-2}
SYMMETRY_TOLERANCE_LOW = 0.3  # 16-bit floats


def symmetry_tolerance(dtype: torch.dtype) -> float:
    r"""The largest :func:`check_symmetry` defect that rounding explains for products in ``dtype``.

    The defect is normalised so that a symmetric operator computed with relative error ε per
    product gives a defect of order ε (:func:`check_symmetry`). Measured on Hessian-vector
    products of MLPs (30 random pairs each): ≤ 1e-15 in float64; in float32 ≤ 2e-6 on an MLP
    well into training and ≤ 8e-5 on one trained to losses of 1e-4 to 1e-6 (1 − p_y cancels,
    the least accurate products of the tests' models); in float16 ≤ 1e-3 and in bfloat16
    ≤ 1e-2. The tolerances (1e-6, 1e-2, 0.3) sit ≥ 30× above those, and below what a wrong
    second derivative gives (torch's ``_weight_norm``: 3e-2 to 2e-1 on a 57-parameter model);
    an antisymmetric part under about 1 % of the operator in float32 goes unreported, and it
    moves the top eigenvalue by about as little.
    """
    return SYMMETRY_TOLERANCE.get(dtype, SYMMETRY_TOLERANCE_LOW)


def symmetry_defect(v: Tensor, av: Tensor, w: Tensor, aw: Tensor) -> float:
    r"""√P |vᵀ(Aw) − wᵀ(Av)| / (‖v‖‖Aw‖ + ‖w‖‖Av‖) for P-vectors v, w and their products.

    Zero for a symmetric A up to rounding (computed in float64). NaN where a product is not
    finite; 0 where both products are zero.
    """
    v, av, w, aw = (t.detach().double().reshape(-1) for t in (v, av, w, aw))
    den = float(v.norm() * aw.norm() + w.norm() * av.norm())
    num = abs(float(v @ aw - w @ av))
    if not (math.isfinite(num) and math.isfinite(den)):
        return math.nan
    if den == 0.0:
        return 0.0
    return math.sqrt(v.numel()) * num / den


def check_symmetry(
    matvec: MatVec,
    dim: int,
    *,
    like: Tensor | None = None,
    generator: torch.Generator | None = None,
    products: Sequence[tuple[Tensor, Tensor]] | None = None,
    tolerance: float | None = None,
) -> SymmetryCheck:
    r"""Check vᵀAw = wᵀAv for random vectors: two products, or none given ``products``.

    Every solver here assumes a symmetric A; a Hessian-vector product is symmetric unless a
    layer's second derivative is computed wrongly. For unit v, w drawn at random, wᵀ(Av) is of
    order ‖Av‖ / √P, and so is wᵀδ for a rounding error δ of relative size ε in Av (δ does not
    depend on w); the defect

        √P |vᵀAw − wᵀAv| / (‖v‖‖Aw‖ + ‖w‖‖Av‖)

    is therefore of order ε for a symmetric A whatever P is, while an antisymmetric part K gives
    |vᵀKw| ≈ ‖K‖_F / P, a defect of order ‖K‖_F / ‖A‖_F. (Without the √P it would shrink with P
    and a float32 tolerance would miss any asymmetry in a large model.) vᵀKw is itself random:
    one pair misses now and then (below a tenth of its typical size in about one case in
    twelve), so with more products given, the largest defect over all their pairs counts.

    Args:
        matvec: v ↦ A v.
        dim: Operator dimension P.
        like: Tensor giving dtype and device of the vectors (default float64 CPU).
        generator: Random generator for v and w.
        products: ≥ 2 pairs (v, Av) already computed for random v (independent, or made
            orthogonal to each other: a cold Lanczos start block): no product is computed.
        tolerance: The largest defect taken for rounding; default by the dtype of the products
            (:func:`symmetry_tolerance`).

    Returns:
        The defect, the tolerance and the products computed.
    """
    like = like if like is not None else torch.zeros((), dtype=torch.float64)
    matvecs = 0
    if products is None:
        vs = [random_unit(dim, like, generator) for _ in range(2)]
        products = [(v, matvec(v)) for v in vs]
        matvecs = 2
    if len(products) < 2:
        raise ValueError("a symmetry check needs at least two products")
    defects = [
        symmetry_defect(*products[i], *products[j])
        for i in range(len(products))
        for j in range(i + 1, len(products))
    ]
    defect = math.nan if any(math.isnan(d) for d in defects) else max(defects)
    tol = tolerance if tolerance is not None else symmetry_tolerance(products[0][1].dtype)
    return SymmetryCheck(defect, tol, matvecs)


def asymmetry_message(check: SymmetryCheck) -> str:
    """The ``hessian-asymmetric`` event's message for a failed symmetry check."""
    return (
        "the Hessian-vector products are not symmetric: for random v, w, vᵀHw − wᵀHv is "
        f"{check.defect:.1e} of their size (rounding explains up to {check.tolerance:.0e}). A "
        "layer's second derivative is computed wrongly or not at all by torch, e.g. "
        "torch._weight_norm called directly (its double backward is wrong; the layers of "
        "torch.nn.utils.weight_norm and its parametrization are measured in plain ops instead); "
        "λ1_H and its comparison with the "
        "threshold may be off. Writing such a layer with plain tensor ops fixes it (weight norm: "
        "a parametrization returning g * v / v.norm(dim=1, keepdim=True), registered with "
        "torch.nn.utils.parametrize.register_parametrization)"
    )
