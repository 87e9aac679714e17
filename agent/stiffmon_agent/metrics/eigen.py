r"""Top eigenpairs and traces of symmetric operators given only as matrix-vector products.

Pure linear algebra on a ``matvec: Tensor (P,) -> Tensor (P,)``; used with Hessian-vector
products for sharpness, but nothing here knows about models.

* :func:`lanczos`: (block) Lanczos with full reorthogonalisation. After m products the basis
  Q_m and T_m = Q_mᵀ A Q_m give Ritz pairs (θ, Q_m s) with residuals ‖A y − θ y‖, and
  |θ − λ| ≤ that residual for some eigenvalue λ of A, and θ_i ≤ λ_i always. A cold start stops
  when the top-k residuals are ≤ ``tol`` · |θ_1|; a warm start also when the error extrapolated
  from the Ritz values' convergence is ≤ ``tol`` · |θ_1| (consistently over two windows) and the
  residual ≤ 3 ``tol`` · |θ_1|, and only once the (k+1)-th Ritz pair no longer reaches θ_k.
* :func:`~stiffmon_agent.metrics.power.power_iteration` (in :mod:`.power`, imported here too):
  the method of PyHessian: v ← Av / ‖Av‖, λ = vᵀAv, stop when
  |λ − λ_prev| / |λ_prev| < ``tol``; further eigenpairs by orthogonalising against the found ones.
  It converges to the largest-magnitude eigenvalue.
* :func:`~stiffmon_agent.metrics.hutchinson.hutchinson_trace` (in :mod:`.hutchinson`, imported
  here too): tr(A) ≈ mean of zᵀAz over Rademacher vectors z.
* :func:`~stiffmon_agent.metrics.symmetry.check_symmetry` (in :mod:`.symmetry`): whether the
  operator is symmetric at all; :func:`lanczos` checks it on a cold start's block.

Both eigen-solvers are warm-startable from the previous result's ``warm_start`` vectors: along a
training run the top eigenvectors move slowly, so the next measurement needs few products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from stiffmon_agent.metrics.hutchinson import TraceEstimate, hutchinson_trace
from stiffmon_agent.metrics.rows import GrowingRows
from stiffmon_agent.metrics.symmetry import MatVec, SymmetryCheck, check_symmetry
from stiffmon_agent.metrics.symmetry import random_unit as _random_unit

__all__ = [
    "EigenResult",
    "MatVec",
    "SymmetryCheck",
    "TraceEstimate",
    "check_symmetry",
    "hutchinson_trace",
    "lanczos",
    "power_iteration",
]

# A warm start accepts an extrapolated error only while the residual is within this many tol.
RESIDUAL_FACTOR = 3.0
# A warm start stops only when the (k+1)-th Ritz pair has θ + REACH_FACTOR · r ≤ θ_k + tol · |θ1|.
REACH_FACTOR = 2.0


@dataclass(frozen=True)
class EigenResult:
    """Top eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: (k,) largest first.
        eigenvectors: (P, k) unit columns (Ritz vectors for Lanczos).
        matvecs: Matrix-vector products used.
        converged: Whether the stopping rule was met within the product budget (what that
            does and does not guarantee: :func:`lanczos`).
        residuals: (k,) ‖A y − θ y‖ of each pair (Lanczos) or relative change (power).
        warm_start: (P, ≤ k + 1) the start block for the next measurement: the top k + 1 Ritz
            vectors (Lanczos; the extra one holds the next eigenvector, in case λ1 and λ2
            cross before then) or the eigenvectors (power iteration).
        cold_checked: A warm result that a cold start checked as well
            (:func:`~stiffmon_agent.metrics.eigen_checked.checked_lanczos`).
        nonfinite: A product was not finite (the iteration stopped there, not converged).
        symmetry: The operator's symmetry check, where one was run: free on a cold Lanczos start
            (the pairs of its random start block), else only where asked for (its products
            counted in ``matvecs``).
        lowest: Lanczos's smallest Ritz value θ_m ≥ λ_min (free: an upper bound of the most
            negative eigenvalue; below −θ_1 the largest-magnitude eigenvalue, which PyHessian's
            power iteration reports, is negative). NaN for power iteration.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    matvecs: int
    converged: bool
    residuals: Tensor
    warm_start: Tensor
    cold_checked: bool = False
    nonfinite: bool = False
    symmetry: SymmetryCheck | None = None
    lowest: float = math.nan


def _norm(v: Tensor, dim: int | None = None) -> Tensor:
    """‖v‖ accumulated in float64: in float32 the squares of entries below ~1e-19 underflow to
    0 (and those above ~1e19 overflow), so a product of a Hessian with λ ~ 1e-30 read as a zero
    residual and a Lanczos solve 51 % low as converged."""
    return torch.linalg.vector_norm(v, dim=dim, dtype=torch.float64)


def _orthonormalise(v: Tensor, basis: list[Tensor] | Tensor) -> Tensor | None:
    """v with the span of ``basis`` (orthonormal vectors: a list, or the rows of an (m, P)
    tensor) projected out twice, normalised; None if nothing is left."""
    n0 = float(_norm(v))
    if not math.isfinite(n0) or n0 == 0.0:
        return None
    q = torch.stack(basis) if isinstance(basis, list) and basis else basis
    if isinstance(q, Tensor) and q.numel():
        for _ in range(2):  # twice is enough
            v = v - q.T @ (q @ v)
    n = float(_norm(v))
    if n <= 1e-10 * n0:
        return None
    return v / n


def _start_block(
    dim: int, init: Tensor | None, block: int, like: Tensor, generator: torch.Generator | None
) -> tuple[list[Tensor], bool]:
    """Orthonormal start vectors: the warm-start columns, else ``block`` random vectors."""
    starts: list[Tensor] = []
    if init is not None and init.numel() and init.shape[0] == dim:
        for col in init.reshape(dim, -1).to(like).T:
            if torch.isfinite(col).all():
                q = _orthonormalise(col, starts)
                if q is not None:
                    starts.append(q)
        if starts:
            return starts, True
    while len(starts) < min(block, dim):
        q = _orthonormalise(_random_unit(dim, like, generator), starts)
        if q is not None:
            starts.append(q)
    return starts, False


def _extrapolated_error(history: list[float]) -> float:
    """Remaining error of a monotonically increasing Ritz value, extrapolated geometrically.

    With the last two increases Δ_m, Δ_{m-1} and ratio ρ = Δ_m / Δ_{m-1} < 1, the increases
    still to come sum to Δ_m ρ / (1 − ρ); ``inf`` when there are fewer than two increases, they
    do not shrink, or one of them is zero (a Ritz value that stalls may be about to jump).
    """
    if len(history) < 3:
        return math.inf
    d1, d0 = history[-1] - history[-2], history[-2] - history[-3]
    if d1 <= 0.0 or d0 <= 0.0 or d1 >= d0:  # a stall is not convergence: no estimate
        return math.inf
    rho = d1 / d0
    return d1 * rho / (1.0 - rho)


def _consistent_extrapolation(history: list[float], slack: float) -> float:
    """:func:`_extrapolated_error` e_m of the last three Ritz values, or ``inf`` unless the limit
    θ_m + e_m agrees within ``slack`` with θ_{m-1} + e_{m-1} predicted from the three before (a
    plateau near a lower eigenvalue, then a jump, can look geometric for one window)."""
    if len(history) < 4:
        return math.inf
    last, before = _extrapolated_error(history[-3:]), _extrapolated_error(history[-4:-1])
    if not abs(history[-1] + last - history[-2] - before) <= slack:  # inf or nan: no evidence
        return math.inf
    return last


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
    block: int = 3,
    extrapolate: bool = True,
) -> EigenResult:
    r"""Top-k (largest algebraic) eigenpairs of a symmetric operator by (block) Lanczos.

    The basis Q_m starts from a block S of b vectors and grows by one vector per product,
    orthogonalised twice against all of Q_m (full reorthogonalisation). Rayleigh–Ritz on
    T_m = Q_mᵀ A Q_m (from the stored products A Q_m) gives Ritz pairs (θ_i, y_i = Q_m s_i) with
    exact residuals r_i = ‖A y_i − θ_i y_i‖. Cold start: S is ``block`` random vectors and the
    space grows as a block Krylov space (A q_j of the previous block). Warm start: S is the
    previous measurement's Ritz vectors (``init``, top k + 1) and the space grows by the
    residual of one of the top k + 1 Ritz pairs: the one whose interval θ_i + r_i reaches
    highest (an eigenvalue above θ_1 would hide there). From one vector this is plain Lanczos;
    from a block, mostly the Krylov space of the current best vector, augmented; and when λ1 and
    λ2 have crossed, the poorly resolved extra vector gets expanded (see the (k+1)-th pair below).

    Stopping. Some eigenvalue of A lies within r_i of θ_i (and within r_i² / δ when the rest of
    the spectrum is δ away: Kato–Temple). The i-th pair is accepted when r_i ≤ ``tol`` · |θ_1|
    (the rule of a cold start), or, on a warm start with ``extrapolate``, when both

    * the remaining error extrapolated from the Ritz value's history (θ_i only increases with
      m, by interlacing; with increases Δ shrinking at the ratio ρ the rest sums to
      Δ ρ / (1 − ρ), counted after the start block) is ≤ ``tol`` · |θ_1|, and the limit so
      predicted moved by ≤ ``tol`` · |θ_1| since the previous product (a Ritz value that slows
      down near a lower eigenvalue, then jumps, fails this), and
    * r_i ≤ 3 · ``tol`` · |θ_1|: by Kato–Temple the error is then within ``tol`` · |θ_1| on its
      own whenever the gap to the rest of the spectrum is at least 9 · ``tol`` · |θ_1|.

    A warm start also waits for the (k+1)-th pair, if any: θ_{k+1} + 2 r_{k+1} ≤ θ_k +
    ``tol`` · |θ_1|. The spectral weights of its Ritz vector have mean θ_{k+1} and variance
    r_{k+1}², so (Cantelli) at most 1/5 of them lies more than ``tol`` · |θ_1| above θ_k: the
    direction of the basis most likely to hold an eigenvector that moved into the top k since
    the previous measurement has been resolved (its residual is expanded until then).

    Guarantees of ``converged``: θ_i ≤ λ_i (interlacing: never an overestimate), and θ_i is
    within r_i ≤ ``tol`` · |θ_1| of *some* eigenvalue (or so estimated by the extrapolation).
    That it is λ_i, not a lower one, no rule on products can prove (a basis orthogonal to an
    eigenvector never sees it); the start makes it likely: a cold start uses ``block`` random
    vectors (a single one misses λ1 in about one start in ten when λ1 and λ2 are a few per cent
    apart), a warm start the previous top k + 1 Ritz vectors and the (k+1)-th pair's check,
    which find an eigenvector that the start block holds in part (λ1 and λ2 crossing, a
    direction rising into the top k), not one it lacks entirely: cold-start now and then.

    Args:
        matvec: v ↦ A v for v of shape (dim,).
        dim: Operator dimension P.
        k: Number of eigenpairs.
        init: Warm start: previous Ritz vectors (P,) or (P, m), the start block (pass the
            previous result's ``warm_start``). None (or a shape mismatch): a cold start from
            ``block`` random vectors.
        tol: Relative error accepted on each of the top-k eigenvalues.
        max_matvecs: Budget of products.
        like: Tensor giving dtype and device (default float64 CPU).
        generator: Random generator for start / restart vectors (the global RNG is not touched).
        block: Block size of a cold start (1: plain Lanczos).
        extrapolate: On warm starts, also accept the extrapolated error (see above).

    Symmetry: a cold start checks vᵀAw = wᵀAv on the pairs of its random start block
    (:func:`check_symmetry`, no extra product; ``symmetry`` on the result), a warm one does not.

    Memory: the basis and its products, 2 m vectors of length P for m products, held in
    tensors that grow with m (:class:`~stiffmon_agent.metrics.rows.GrowingRows`: at most
    2 × that while they double), not allocated for ``max_matvecs`` up front.
    """
    like = like if like is not None else torch.zeros((), dtype=torch.float64)
    k = max(1, min(k, dim))
    pending, warm = _start_block(dim, init, max(1, block), like, generator)
    b = len(pending)
    cap = max(1, min(max_matvecs, dim))
    qs = GrowingRows(dim, like, cap)  # basis Q_m, as rows
    ws = GrowingRows(dim, like, cap)  # products A Q_m, as rows
    m = 0
    t = torch.zeros(cap, cap, dtype=torch.float64)
    theta = torch.zeros(0, dtype=torch.float64)
    s = torch.zeros(0, 0, dtype=torch.float64)
    residuals = torch.full((k,), float("inf"), dtype=torch.float64)
    history: list[list[float]] = [[] for _ in range(k)]  # θ_i after the start block
    r_vecs: Tensor | None = None  # residuals A y_i − θ_i y_i of the top k + 1 Ritz pairs
    reach = torch.zeros(0, dtype=torch.float64)
    converged = nonfinite = False
    symmetry: SymmetryCheck | None = None
    while m < cap:
        if not pending:
            nxt = None
            if warm and r_vecs is not None:  # the pair whose interval θ_i + r_i reaches highest
                for i in reach.argsort(descending=True).tolist():
                    if reach[i] == -math.inf:
                        break
                    nxt = _orthonormalise(r_vecs[:, i], qs.rows())
                    if nxt is not None:
                        break
            else:
                for j in range(max(0, m - b), m):  # block Krylov: A q_j of the previous block
                    nxt = _orthonormalise(ws[j], qs.rows())
                    if nxt is not None:
                        break
            if nxt is None:  # invariant subspace: a fresh direction finds repeated eigenvalues
                nxt = _orthonormalise(_random_unit(dim, like, generator), qs.rows())
            if nxt is None:
                break
            pending.append(nxt)
        q = pending.pop(0)
        w = matvec(q).to(like)
        if not bool(torch.isfinite(w).all()):  # overflow: nothing below would mean anything
            nonfinite = True
            break
        qs.append(q)
        ws.append(w)
        m += 1
        if not warm and m == b and b >= 2:  # the random start block's pairs: a free check
            symmetry = check_symmetry(matvec, dim, products=[(qs[j], ws[j]) for j in range(b)])
        col = (qs.rows() @ w).to(torch.float64).cpu()
        t[:m, m - 1] = col
        t[m - 1, :m] = col
        theta, s = torch.linalg.eigh(t[:m, :m])
        theta, s = theta.flip(0), s.flip(1)
        if not bool(torch.isfinite(theta).all()):
            break
        if pending:
            continue
        for i in range(min(k, m)):
            history[i].append(float(theta[i]))
        if m < k:
            r_vecs = None
            continue
        top = min(k + 1, m)
        st = s[:, :top].to(like)
        r_vecs = ws.rows().T @ st - (qs.rows().T @ st) * theta[:top].to(like)
        res_all = _norm(r_vecs, dim=0).cpu()
        reach = theta[:top] + res_all  # some eigenvalue lies within θ_i ± r_i
        residuals = res_all[:k]
        scale = max(abs(float(theta[0])), 1e-300)
        ok = True
        for i in range(k):
            err = float(res_all[i])
            if extrapolate and warm and err <= RESIDUAL_FACTOR * tol * scale:
                err = min(err, _consistent_extrapolation(history[i], tol * scale))
            if err <= tol * scale:
                reach[i] = -math.inf  # accepted: not expanded further
            else:
                ok = False
        if ok and warm and top > k:  # the (k+1)-th pair must not reach above θ_k
            ok = float(theta[k] + REACH_FACTOR * res_all[k]) <= float(theta[k - 1]) + tol * scale
        if ok and (warm or m >= 2 * b):
            converged = True
            break
    top = min(k, m)
    if m == 0:
        empty = torch.zeros(dim, 0, dtype=like.dtype, device=like.device)
        return EigenResult(
            theta[:0].to(like), empty, 0, False, residuals[:0], empty, nonfinite=nonfinite
        )
    vecs = qs.rows().T @ s[:, : min(k + 1, m)].to(like)
    del qs, ws
    vecs = vecs / vecs.norm(dim=0).clamp_min(1e-300)  # unit-scale columns: no underflow
    return EigenResult(
        eigenvalues=theta[:top].to(like),
        eigenvectors=vecs[:, :top],
        matvecs=m,
        converged=converged,
        residuals=residuals[:top],
        warm_start=vecs,
        nonfinite=nonfinite,
        symmetry=symmetry,
        lowest=float(theta[-1]) if theta.numel() else math.nan,
    )


from stiffmon_agent.metrics.power import power_iteration  # noqa: E402  (uses EigenResult)
