r"""Sharpness: top eigenvalues of the loss Hessian and the optimizer's stability threshold.

The Hessian is that of the training objective on a fixed probe batch, over the trainable
parameters: ``scale`` × (1/N) Σ_i L_i(θ), with L_i each example's contribution
(:mod:`~stiffmon_agent.metrics.probe`); ``scale`` is 1 for a mean-reduced loss and the training
batch size B for a sum-reduced one (Σ over a batch of B = B × the per-example mean).
Hessian-vector products H v are computed forward-over-reverse,
``jvp(grad(L), (θ,), (v,))`` with ``torch.func``, or by double backward
∇_θ (∇_θ L · v) when ``torch.func`` cannot trace the model. The top eigenvalue λ1_H is found by
Lanczos or power iteration (:mod:`stiffmon_agent.metrics.eigen`), warm-started from the previous
measurement's eigenvectors. The solvers assume H symmetric; a layer whose second derivative
torch computes wrongly breaks that (torch's ``_weight_norm``): a cold Lanczos start checks
vᵀHw = wᵀHv on its random start vectors at no cost
(:func:`~stiffmon_agent.metrics.eigen.check_symmetry`), and ``symmetry_check=`` of
:func:`hessian_eigen` buys the check with two more products where the solve had no cold start.

Stability thresholds live in :mod:`~stiffmon_agent.metrics.thresholds`. For Adam / AdamW /
RMSprop the sharpness that matters is the *preconditioned* one, λ1(P⁻¹H) (Cohen et al. 2022),
computed here by the same Lanczos on the symmetric D H D with D = P^{-1/2}
(``preconditioner=`` of :func:`hessian_eigen`), which has the same eigenvalues as P⁻¹H.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from stiffmon_agent.metrics.eigen import (
    EigenResult,
    TraceEstimate,
    hutchinson_trace,
)
from stiffmon_agent.metrics.pinned_rng import cuda_devices, pinned
from stiffmon_agent.metrics.probe import (
    Batch,
    ForwardFn,
    ForwardModule,
    LossFn,
    batch_size,
    default_forward,
    per_example_losses,
    take,
    unreduced,
)
from stiffmon_agent.metrics.restricted import (
    restriction_for,
    untouched_top,
    with_untouched,
)
from stiffmon_agent.metrics.solve import solve_operator
from stiffmon_agent.metrics.state import (
    dense,
    flat_grads,
    measurement_mode,
    trainable_parameters,
)

Backend = Literal["auto", "graph", "func", "double-backward"]


@functools.cache
def _load_jvp_decompositions() -> None:
    """Load what forward-mode AD loads at its first use, without the ``torch.jit.script is
    deprecated`` FutureWarning torch's own loading raises (it would reach the user's console
    as if their script used TorchScript)."""
    if os.environ.get("PYTORCH_JIT", "1") != "1" or not __debug__:
        return  # torch does not load them either
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*torch\.jit\.script", FutureWarning)
        from torch._decomp import decompositions_for_jvp  # noqa: F401


class HessianOperator:
    """v ↦ H v for the Hessian of the mean probe loss over the trainable parameters.

    Use inside :func:`~stiffmon_agent.metrics.state.measurement_mode` (the functions of this
    module do): the operator runs the model as it is.

    Args:
        model: The network.
        inputs: Probe inputs, examples along dim 0.
        targets: Probe targets.
        loss_fn: Loss module or per-example loss callable.
        forward: ``forward(model, inputs)``; default ``model(inputs)``.
        chunk_size: Examples per pass; H v = Σ_c (n_c / N) H_c v. None: one pass.
        scale: The objective is ``scale`` × the per-example mean (B for a sum-reduced loss).
        backend: ``"graph"`` (double backward through a first-order graph built once and kept
            for the whole measurement: fastest, one chunk only), ``"func"``
            (forward-over-reverse with ``torch.func``), ``"double-backward"`` (rebuilds the graph
            every product), or ``"auto"``: the first of these that works.

    Attributes:
        dim: Number of trainable parameters P.
        calls: Hessian-vector products computed so far.
        backend: The backend in use.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Batch,
        targets: Batch,
        loss_fn: LossFn,
        *,
        forward: ForwardFn | None = None,
        chunk_size: int | None = None,
        scale: float = 1.0,
        backend: Backend = "auto",
    ) -> None:
        self.model = model
        self.scale = float(scale)
        self.forward = forward or default_forward
        self.loss_fn = unreduced(loss_fn)
        self.n = batch_size(inputs)
        self.names = list(trainable_parameters(model))
        if not self.names:
            raise ValueError("the model has no trainable parameters")
        params = trainable_parameters(model)
        self.params = [params[k] for k in self.names]
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.dim = sum(self.sizes)
        self._devices = cuda_devices(self.params)  # random forwards: one draw per chunk (pinned)
        chunk = self.n if not chunk_size else max(1, min(chunk_size, self.n))
        self.chunks = [
            (
                take(inputs, slice(s, min(s + chunk, self.n))),
                take(targets, slice(s, min(s + chunk, self.n))),
                min(s + chunk, self.n) - s,
            )
            for s in range(0, self.n, chunk)
        ]
        self.backend: str = backend
        self.calls = 0
        self._wrapper = ForwardModule(model, self.forward)
        self._graph: tuple[Tensor | None, ...] | None = None
        self._backends = {
            "graph": self._hvp_graph,
            "func": self._hvp_func,
            "double-backward": self._hvp_double_backward,
        }
        if backend == "graph" and len(self.chunks) > 1:
            raise ValueError("the 'graph' backend keeps one first-order graph: use chunk_size=None")

    @property
    def like(self) -> Tensor:
        """A tensor with the parameters' dtype and device."""
        return self.params[0]

    def _split(self, v: Tensor) -> list[Tensor]:
        return [c.view(s) for c, s in zip(v.split(self.sizes), self.shapes, strict=True)]

    def _mean_loss(self, x: Batch, y: Batch, n: int, out: Any) -> Tensor:
        return self.scale * per_example_losses(self.loss_fn, out, y, n).mean()

    def _hvp_func(self, v: Tensor) -> Tensor:
        _load_jvp_decompositions()
        primals = {f"model.{k}": p.detach() for k, p in zip(self.names, self.params, strict=True)}
        tangents = dict(zip(primals, self._split(v), strict=True))
        total = torch.zeros_like(v)
        for c, (x, y, n) in enumerate(self.chunks):

            def loss(p: dict[str, Tensor], x: Batch = x, y: Batch = y, n: int = n) -> Tensor:
                out = functional_call(self._wrapper, p, (x,), strict=False, tie_weights=True)
                return self._mean_loss(x, y, n, out)

            with pinned(c, self._devices):
                _, hv = jvp(grad(loss), (primals,), (tangents,))
            total += (n / self.n) * torch.cat([dense(hv[k]).reshape(-1) for k in primals])
        return total

    def _hvp_double_backward(self, v: Tensor) -> Tensor:
        total = torch.zeros_like(v)
        vs = self._split(v)
        for c, (x, y, n) in enumerate(self.chunks):
            with pinned(c, self._devices):
                loss = self._mean_loss(x, y, n, self.forward(self.model, x))
            g = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            total += (n / self.n) * self._second(g, vs, retain=False)
        return total

    def _second(self, g: tuple[Tensor | None, ...], vs: list[Tensor], retain: bool) -> Tensor:
        """∇(g · v) flattened (zeros where a parameter does not enter the loss)."""
        terms = [(gi * vi).sum() for gi, vi in zip(g, vs, strict=True) if gi is not None]
        hv: tuple[Tensor | None, ...] = (None,) * len(self.params)
        if terms and any(t.requires_grad for t in terms):
            dot = torch.stack(terms).sum()
            hv = torch.autograd.grad(dot, self.params, retain_graph=retain, allow_unused=True)
        return flat_grads(hv, self.params)

    def _hvp_graph(self, v: Tensor) -> Tensor:
        """Double backward through a first-order graph built once and kept (one chunk only)."""
        if self._graph is None:
            ((x, y, n),) = self.chunks
            with pinned(0, self._devices):
                loss = self._mean_loss(x, y, n, self.forward(self.model, x))
            self._graph = torch.autograd.grad(
                loss, self.params, create_graph=True, allow_unused=True
            )
        return self._second(self._graph, self._split(v), retain=True)

    def __call__(self, v: Tensor) -> Tensor:
        """H v for a flat vector v of length :attr:`dim`."""
        v = v.to(self.like)
        if self.backend == "auto":
            candidates = (["graph"] if len(self.chunks) == 1 else []) + ["func", "double-backward"]
            for i, name in enumerate(candidates):
                try:
                    out = self._backends[name](v)
                except Exception:
                    self._graph = None
                    if i == len(candidates) - 1:
                        raise
                    continue
                self.backend = name
                break
        else:
            out = self._backends[self.backend](v)
        self.calls += 1
        return out.detach()

    def gradient(self) -> Tensor:
        """∇L of the mean probe loss, flattened (for timing HVPs against gradients)."""
        total = torch.zeros(self.dim, dtype=self.like.dtype, device=self.like.device)
        for c, (x, y, n) in enumerate(self.chunks):
            with pinned(c, self._devices):
                loss = self._mean_loss(x, y, n, self.forward(self.model, x))
            g = torch.autograd.grad(loss, self.params, allow_unused=True)
            total += (n / self.n) * flat_grads(g, self.params)
        return total


def hessian_eigen(
    model: nn.Module,
    inputs: Batch,
    targets: Batch,
    loss_fn: LossFn,
    *,
    k: int = 1,
    method: Literal["lanczos", "power"] = "lanczos",
    warm_start: Tensor | None = None,
    tol: float = 1e-2,
    max_hvps: int = 100,
    forward: ForwardFn | None = None,
    chunk_size: int | None = None,
    backend: Backend = "auto",
    generator: torch.Generator | None = None,
    scale: float = 1.0,
    preconditioner: Tensor | None = None,
    shift: Tensor | None = None,
    wrap: Callable[[HessianOperator], Callable[[Tensor], Tensor]] | None = None,
    check_below: float | None = None,
    symmetry_check: bool = False,
    restrict: bool | None = None,
) -> EigenResult:
    """Top-k Hessian eigenvalues λ1_H ≥ λ2_H ≥ … of the probe objective.

    With ``check_below`` a warm Lanczos result below it is checked by a cold start
    (:func:`~stiffmon_agent.metrics.eigen_checked.checked_lanczos`).

    Args:
        model: The network (measured in eval mode, restored afterwards).
        inputs: Probe inputs.
        targets: Probe targets.
        loss_fn: Loss module or per-example loss callable.
        k: Number of eigenvalues.
        method: ``"lanczos"`` (tolerance on the Ritz residual relative to |λ1|) or ``"power"``
            (tolerance on the relative change of the estimate, as PyHessian).
        warm_start: Previous result's ``warm_start`` (P, m) (its ``eigenvectors`` work too,
            without the extra vector that catches a crossing of λ1 and λ2); ignored if P changed.
        tol: Convergence tolerance (see ``method``).
        max_hvps: Budget of Hessian-vector products.
        forward: ``forward(model, inputs)``.
        chunk_size: Examples per pass.
        backend: HVP backend (see :class:`HessianOperator`).
        generator: Random generator for cold starts (the global RNG is not touched anyway).
        scale: The objective is ``scale`` × the per-example mean (see :class:`HessianOperator`).
        preconditioner: Flat diagonal P (length P, positive; ``inf`` for parameters the
            optimizer does not move): the eigenvalues are then those of P⁻¹H, computed on the
            symmetric D H D with D = P^{-1/2}; the eigenvectors returned are those of D H D.
        shift: Flat diagonal S added to H under the preconditioner (coupled L2 decay wd of an
            adaptive optimizer, which steps on P⁻¹(H + S)): D (H + S) D is solved.
        wrap: Turns the operator into the H v that is solved for (sharded measurement: the
            operator holds this process's examples and ``wrap`` sums the products of every
            process, :class:`~stiffmon_agent.distributed.HvpLeader`); None: the operator itself.
        check_below: Check a warm (Lanczos) result whose θ1 is below this by a cold start
            (``math.inf``: always); None: never.
        symmetry_check: Check that the solved operator is symmetric (``symmetry`` on the
            result) even where the solve did not (a warm start without a cold check, power
            iteration): two more products of random vectors from ``generator``, counted in
            ``matvecs``. A cold Lanczos start checks anyway, at no cost.
        restrict: Solve on the embedding rows the probe touches where that is exact
            (:mod:`~stiffmon_agent.metrics.restricted`: H = H_TT ⊕ 0, the untouched block's
            exact diagonal merged in); not with ``wrap`` (each process touches its own rows).
            The eigenvectors and warm start are then in the restricted coordinates. None: where
            the untouched rows hold at least
            :data:`~stiffmon_agent.metrics.restricted.RESTRICT_MIN` parameters (a smaller model
            is solved whole, as a sharded measurement solves it); True: wherever exact.

    Returns:
        Eigenvalues (largest first), eigenvectors, the start block for the next warm start
        (``warm_start``), the HVP count, and the symmetry check.
    """

    def build() -> HessianOperator:
        return HessianOperator(
            model,
            inputs,
            targets,
            loss_fn,
            forward=forward,
            chunk_size=chunk_size,
            backend=backend,
            scale=scale,
        )

    with measurement_mode(model):
        op = build()
        if preconditioner is not None and preconditioner.shape != (op.dim,):
            raise ValueError(f"preconditioner has shape {tuple(preconditioner.shape)}")
        kw: dict[str, Any] = {
            "k": k,
            "method": method,
            "init": warm_start,
            "tol": tol,
            "max_matvecs": max_hvps,
            "generator": generator,
            "check_below": check_below,
            "symmetry_check": symmetry_check,
        }
        found = restriction_for(model, op, restrict, sharded=wrap is not None)
        if found is None:
            hv: Callable[[Tensor], Tensor] = op if wrap is None else wrap(op)
            return solve_operator(hv, op.dim, op.like.detach(), preconditioner, shift, **kw)
        gather = functools.partial(found.gather, names=op.names, sizes=op.sizes)
        with found.applied():  # H_TT: the compact tables in place of the whole ones
            rop = build()
            pre = None if preconditioner is None else gather(preconditioner.detach().to(op.like))
            sh = None if shift is None or pre is None else gather(shift.detach().to(op.like))
            res = solve_operator(rop, rop.dim, rop.like.detach(), pre, sh, **kw)
        top = untouched_top(found, op.names, op.sizes, preconditioner, shift, k)
        return with_untouched(res, top, k)


def hessian_trace(
    model: nn.Module,
    inputs: Batch,
    targets: Batch,
    loss_fn: LossFn,
    *,
    samples: int = 20,
    forward: ForwardFn | None = None,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    scale: float = 1.0,
) -> TraceEstimate:
    """Hutchinson estimate of tr(H) for the probe objective (``scale`` × the mean loss)."""
    with measurement_mode(model):
        op = HessianOperator(
            model, inputs, targets, loss_fn, forward=forward, chunk_size=chunk_size, scale=scale
        )
        return hutchinson_trace(op, op.dim, samples, like=op.like.detach(), generator=generator)
