r"""Sharpness: top eigenvalues of the loss Hessian and the optimizer's stability threshold.

The Hessian is that of the mean loss L(θ) = (1/N) Σ_i L(x_i, y_i; θ) on a fixed probe batch,
over the trainable parameters. Hessian-vector products H v are computed forward-over-reverse,
``jvp(grad(L), (θ,), (v,))`` with ``torch.func``, or by double backward
∇_θ (∇_θ L · v) when ``torch.func`` cannot trace the model. The top eigenvalue λ1_H is found by
Lanczos or power iteration (:mod:`stiffmon_agent.metrics.eigen`), warm-started from the previous
measurement's eigenvectors.

Stability threshold (a quadratic with curvature λ is stable under the optimizer iff λ < it):
2/η for SGD, (2 + 2β)/η for heavy-ball momentum β, (2 + 2β)/((1 + 2β) η) for Nesterov momentum.
PyTorch's SGD ``dampening`` τ scales the gradient by (1 − τ), i.e. the step size to η(1 − τ).
Adaptive optimizers (Adam, RMSprop, Adagrad, ...) precondition the gradient, so no threshold on
λ1_H of the raw Hessian applies: :func:`stability_threshold_for` says so instead of inventing one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from stiffmon_agent.metrics.eigen import (
    EigenResult,
    TraceEstimate,
    hutchinson_trace,
    lanczos,
    power_iteration,
)
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
from stiffmon_agent.metrics.state import measurement_mode, trainable_parameters

Backend = Literal["auto", "graph", "func", "double-backward"]


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
        backend: Backend = "auto",
    ) -> None:
        self.model = model
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
        self._graph: tuple[Tensor, ...] | None = None
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
        return per_example_losses(self.loss_fn, out, y, n).mean()

    def _hvp_func(self, v: Tensor) -> Tensor:
        primals = {f"model.{k}": p.detach() for k, p in zip(self.names, self.params, strict=True)}
        tangents = dict(zip(primals, self._split(v), strict=True))
        total = torch.zeros_like(v)
        for x, y, n in self.chunks:

            def loss(p: dict[str, Tensor], x: Batch = x, y: Batch = y, n: int = n) -> Tensor:
                out = functional_call(self._wrapper, p, (x,), strict=False, tie_weights=True)
                return self._mean_loss(x, y, n, out)

            _, hv = jvp(grad(loss), (primals,), (tangents,))
            total += (n / self.n) * torch.cat([hv[k].reshape(-1) for k in primals])
        return total

    def _hvp_double_backward(self, v: Tensor) -> Tensor:
        total = torch.zeros_like(v)
        vs = self._split(v)
        for x, y, n in self.chunks:
            loss = self._mean_loss(x, y, n, self.forward(self.model, x))
            g = torch.autograd.grad(loss, self.params, create_graph=True)
            dot = sum((gi * vi).sum() for gi, vi in zip(g, vs, strict=True))
            hv = torch.autograd.grad(dot, self.params, allow_unused=True)
            flat = [
                (h if h is not None else torch.zeros_like(p)).reshape(-1)
                for h, p in zip(hv, self.params, strict=True)
            ]
            total += (n / self.n) * torch.cat(flat)
        return total

    def _hvp_graph(self, v: Tensor) -> Tensor:
        """Double backward through a first-order graph built once and kept (one chunk only)."""
        if self._graph is None:
            ((x, y, n),) = self.chunks
            loss = self._mean_loss(x, y, n, self.forward(self.model, x))
            self._graph = torch.autograd.grad(loss, self.params, create_graph=True)
        dot = sum((gi * vi).sum() for gi, vi in zip(self._graph, self._split(v), strict=True))
        hv = torch.autograd.grad(dot, self.params, retain_graph=True, allow_unused=True)
        return torch.cat(
            [
                (h if h is not None else torch.zeros_like(p)).reshape(-1)
                for h, p in zip(hv, self.params, strict=True)
            ]
        )

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
        for x, y, n in self.chunks:
            loss = self._mean_loss(x, y, n, self.forward(self.model, x))
            g = torch.autograd.grad(loss, self.params, allow_unused=True)
            total += (n / self.n) * torch.cat(
                [
                    (gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                    for gi, p in zip(g, self.params, strict=True)
                ]
            )
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
) -> EigenResult:
    """Top-k Hessian eigenvalues λ1_H ≥ λ2_H ≥ … of the mean probe loss.

    Args:
        model: The network (measured in eval mode, restored afterwards).
        inputs: Probe inputs.
        targets: Probe targets.
        loss_fn: Loss module or per-example loss callable.
        k: Number of eigenvalues.
        method: ``"lanczos"`` (tolerance on the Ritz residual relative to |λ1|) or ``"power"``
            (tolerance on the relative change of the estimate, as PyHessian).
        warm_start: Previous result's ``eigenvectors`` (P, m); ignored if P changed.
        tol: Convergence tolerance (see ``method``).
        max_hvps: Budget of Hessian-vector products.
        forward: ``forward(model, inputs)``.
        chunk_size: Examples per pass.
        backend: HVP backend (see :class:`HessianOperator`).
        generator: Random generator for cold starts (the global RNG is not touched anyway).

    Returns:
        Eigenvalues (largest first), eigenvectors for the next warm start, and the HVP count.
    """
    with measurement_mode(model):
        op = HessianOperator(
            model, inputs, targets, loss_fn, forward=forward, chunk_size=chunk_size, backend=backend
        )
        solver = lanczos if method == "lanczos" else power_iteration
        return solver(
            op,
            op.dim,
            k,
            init=warm_start,
            tol=tol,
            max_matvecs=max_hvps,
            like=op.like.detach(),
            generator=generator,
        )


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
) -> TraceEstimate:
    """Hutchinson estimate of tr(H) for the mean probe loss."""
    with measurement_mode(model):
        op = HessianOperator(
            model, inputs, targets, loss_fn, forward=forward, chunk_size=chunk_size
        )
        return hutchinson_trace(op, op.dim, samples, like=op.like.detach(), generator=generator)


@dataclass(frozen=True)
class StabilityThreshold:
    """The largest stable curvature for an optimizer, or why there is none.

    Attributes:
        value: The threshold on λ1_H, or None when no threshold applies.
        rule: How it was computed, e.g. ``"(2+2β)/η"``, or why there is none.
    """

    value: float | None
    rule: str


_ADAPTIVE = {
    "Adam",
    "AdamW",
    "Adamax",
    "NAdam",
    "RAdam",
    "SparseAdam",
    "Adagrad",
    "Adadelta",
    "RMSprop",
    "Rprop",
    "LBFGS",
    "Adafactor",
    "Lion",
    "Adan",
    "Shampoo",
    "Muon",
}


def stability_threshold(
    lr: float, momentum: float = 0.0, *, nesterov: bool = False, dampening: float = 0.0
) -> StabilityThreshold:
    """Stability threshold of (momentum) gradient descent with learning rate η = ``lr``.

    2/η without momentum, (2 + 2β)/η with heavy-ball momentum β, (2 + 2β)/((1 + 2β) η) with
    Nesterov momentum; with dampening τ, η is replaced by η (1 − τ).
    """
    eta = lr * (1.0 - dampening)
    if eta <= 0:
        return StabilityThreshold(None, f"none: non-positive effective learning rate {eta}")
    beta = momentum
    if beta == 0.0:
        return StabilityThreshold(2.0 / eta, "2/η")
    if nesterov:
        return StabilityThreshold(
            (2.0 + 2.0 * beta) / ((1.0 + 2.0 * beta) * eta), "(2+2β)/((1+2β)η)"
        )
    return StabilityThreshold((2.0 + 2.0 * beta) / eta, "(2+2β)/η")


def stability_threshold_for(optimizer: torch.optim.Optimizer, group: int = 0) -> StabilityThreshold:
    """Threshold for a torch optimizer's param group (None for adaptive optimizers)."""
    name = type(optimizer).__name__
    g = optimizer.param_groups[group]
    if name == "SGD":
        return stability_threshold(
            float(g["lr"]),
            float(g.get("momentum", 0.0)),
            nesterov=bool(g.get("nesterov", False)),
            dampening=float(g.get("dampening", 0.0)),
        )
    if name in _ADAPTIVE:
        return StabilityThreshold(None, f"none: {name} is adaptive (preconditioned steps)")
    return StabilityThreshold(None, f"none: no stability rule known for {name}")
