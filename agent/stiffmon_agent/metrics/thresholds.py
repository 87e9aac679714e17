r"""Stability thresholds on λ1_H of (momentum) SGD and ASGD, and why other optimizers have none.

A quadratic with curvature λ is stable under an optimizer iff λ is below its threshold. With
learning rate η (of the param group, at the step being measured: schedules, ReduceLROnPlateau and
lr set by hand are followed, as the step used them):

* SGD: 2/η; heavy-ball momentum β: (2 + 2β)/η; Nesterov momentum β: (2 + 2β)/((1 + 2β) η).
  ``dampening`` τ scales the gradient by (1 − τ), i.e. η by (1 − τ). Coupled ``weight_decay``
  wd adds wd·θ to the gradient, so the curvature the optimizer sees is λ + wd: the threshold on
  λ1_H is the bound minus wd.
* ASGD: before its averaging starts (t0) and after, the iterate steps θ ← (1 − λ η_t) θ − η_t g
  with the decayed step size η_t = lr/(1+λ·lr·t)^α of its state (``eta``), not the group's lr:
  2/η_t − wd − λ (λ = ``lambd``; the averaging does not feed back into the iterate); the rule
  shows η_t's value (the ``lr`` column is the group's lr).
* The adaptive optimizers (Adam, AdamW, Adamax, RAdam, NAdam, SparseAdam, RMSprop, Adagrad,
  Adadelta) have none on λ1_H; theirs is on λ1(P⁻¹H)
  (:mod:`~stiffmon_agent.metrics.precond_thresholds`).
* No curvature bound, with the reason (:func:`no_bound_reason`): sign updates (Rprop, Lion,
  signSGD: |Δθ_i| does not grow with the curvature, so they oscillate rather than diverge),
  LBFGS (quasi-Newton: its step divides by its own curvature estimate), SAM (its gradient is
  taken at a perturbed point), Lookahead and other wrappers (their step is not the inner
  optimizer's).

A subclass of one of these that keeps its ``step`` gets its rule; one that overrides ``step``
gets none (:mod:`~stiffmon_agent.metrics.optimizer_kind`).

With several param groups the most restrictive group decides; ``group`` says which.

``maximize=True`` (gradient ascent on the loss f) is descent on −f: the thresholds hold for the
Hessian of −f, which the agent measures for such an optimizer (:func:`maximizes`); param groups
that differ in ``maximize`` descend no single objective, and have no threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from stiffmon_agent.metrics.optimizer_kind import PRECONDITIONED, TORCH_ADAPTIVE, optimizer_kind
from stiffmon_agent.metrics.optimizer_kind import number as _num
from stiffmon_agent.metrics.precond_thresholds import (
    nadam_coefficients as nadam_coefficients,
)
from stiffmon_agent.metrics.precond_thresholds import (
    preconditioned_threshold_for as preconditioned_threshold_for,
)
from stiffmon_agent.metrics.precond_warmup import momentum_warmup as momentum_warmup
from stiffmon_agent.metrics.preconditioner import coupled_decay as coupled_decay
from stiffmon_agent.metrics.preconditioner import (
    diagonal_preconditioner as diagonal_preconditioner,
)
from stiffmon_agent.metrics.threshold_base import MIXED as _MIXED
from stiffmon_agent.metrics.threshold_base import StabilityThreshold as StabilityThreshold
from stiffmon_agent.metrics.threshold_base import frozen as _frozen
from stiffmon_agent.metrics.threshold_base import maximizes as maximizes
from stiffmon_agent.metrics.threshold_base import most_restrictive as _most_restrictive
from stiffmon_agent.metrics.threshold_base import still as _still

_ADAPTIVE = TORCH_ADAPTIVE | {"Adan", "Shampoo"}  # and others' by name

_SIGN = (
    "its steps are sign-based (each weight moves by a step size of its own, whatever the "
    "curvature), so a sharp direction makes it oscillate at that step's size, not diverge: "
    "no curvature bound"
)
_NO_BOUND = {
    "Rprop": f"Rprop: {_SIGN} (its step sizes shrink by etaminus on each sign flip; on ½λx² it "
    "converges at any λ)",
    "LBFGS": "LBFGS is quasi-Newton (its step divides by its own curvature estimate, over "
    "max_iter inner iterations of the closure, with an optional line search): no bound on λ1_H "
    "(on ½λx² it converges at any λ)",
}


def no_bound_reason(optimizer: Any) -> str:
    """Why ``optimizer`` has no curvature bound, for the ones known to have none; "" else.

    Sign updates (Rprop, Lion, signSGD/Signum: θ ← θ − η·sign(·)): |Δθ_i| = η whatever the
    curvature. LBFGS: quasi-Newton. SAM (a ``first_step`` / ``second_step`` wrapper): its
    gradient is taken at θ + ρ g/‖g‖, so on ½λx² its step is ηλ(x + ρ·sign x): stability
    depends on ρ and ‖g‖, not on η alone. Lookahead (θ_s ← θ_s + α(θ_fast − θ_s) every k inner
    steps): with plain GD inside (r = 1 − ηλ) stable iff |1 − α + α r^k| < 1, the inner bound
    for even k and above it for odd k; with momentum inside no closed form.
    """
    name = type(optimizer).__name__
    low = name.lower()
    if name in _NO_BOUND:
        return _NO_BOUND[name]
    if "lion" in low or low.startswith(("signsgd", "signum")):
        return f"{name}: {_SIGN}"
    if callable(getattr(optimizer, "first_step", None)) and callable(
        getattr(optimizer, "second_step", None)
    ):
        return (
            f"{name} is SAM-like (first_step/second_step): its gradient is taken at the "
            "perturbed point θ + ρ∇f/‖∇f‖, so its stable curvature depends on ρ and ‖∇f‖, not "
            "on η alone; its base optimizer's bound does not apply"
        )
    if "lookahead" in low:
        return (
            f"{name}: every k inner steps the slow weights move θ_s ← θ_s + α(θ_fast − θ_s), "
            "so its bound depends on k and α (with plain SGD inside: stable iff "
            "|1 − α + α(1 − ηλ)^k| < 1), not the inner optimizer's; no threshold"
        )
    return ""


def stability_threshold(
    lr: float,
    momentum: float = 0.0,
    *,
    nesterov: bool = False,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
) -> StabilityThreshold:
    """Stability threshold on λ1_H of (momentum) SGD with learning rate η = ``lr``.

    2/η without momentum, (2 + 2β)/η with heavy-ball momentum β, (2 + 2β)/((1 + 2β) η) with
    Nesterov momentum; with dampening τ, η is replaced by η (1 − τ); coupled weight decay wd
    is subtracted (the optimizer sees the curvature λ + wd).
    """
    eta = lr * (1.0 - dampening) if momentum else lr
    if lr == 0:
        return _still()
    if eta <= 0:
        return StabilityThreshold(None, f"none: non-positive effective learning rate {eta}")
    beta = momentum
    if beta == 0.0:
        value, rule = 2.0 / eta, "2/η"
    elif nesterov:
        value, rule = (2.0 + 2.0 * beta) / ((1.0 + 2.0 * beta) * eta), "(2+2β)/((1+2β)η)"
    else:
        value, rule = (2.0 + 2.0 * beta) / eta, "(2+2β)/η"
    if dampening and momentum:
        rule = rule.replace("η", "η(1-τ)")
    if weight_decay:
        value, rule = value - weight_decay, f"{rule} - wd"
    return StabilityThreshold(value, rule)


def zero_inner(optimizer: Any) -> torch.optim.Optimizer | None:
    """The local optimizer of a ``torch.distributed.optim.ZeroRedundancyOptimizer`` (its
    ``param_groups`` are the global ones, with every parameter and the hyper-parameters its
    steps use; its state is sharded over the ranks); None for any other optimizer."""
    if type(optimizer).__name__ != "ZeroRedundancyOptimizer":  # torch's, not subclassed
        return None
    inner = getattr(optimizer, "optim", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else None


def stability_threshold_for(
    optimizer: torch.optim.Optimizer,
    group: int | None = None,
    groups: Sequence[dict[str, Any]] | None = None,
) -> StabilityThreshold:
    """Threshold on the raw λ1_H for a torch optimizer: the most restrictive param group.

    Args:
        optimizer: The optimizer (its type decides the rule).
        group: Only this param group; None: all of them, the smallest threshold wins.
        groups: The param groups' values to use (e.g. as the last step used them); None: the
            optimizer's as they are now.

    Returns:
        The threshold (None for adaptive optimizers: see :func:`preconditioned_threshold_for`).
    """
    kind = optimizer_kind(optimizer)
    name = kind.label
    if maximizes(optimizer) is None:
        return StabilityThreshold(None, f"{_MIXED} ({name})")
    numbered = list(enumerate(groups if groups is not None else optimizer.param_groups))
    inner = zero_inner(optimizer)
    if inner is not None:  # its global groups hold every parameter, its rule is the inner one's
        kind = optimizer_kind(inner)
        name = kind.label
        if kind.rule in PRECONDITIONED | _ADAPTIVE:
            return StabilityThreshold(
                None,
                f"none: ZeroRedundancyOptimizer({name}) is adaptive and its state (P) is sharded "
                "over the ranks: no λ1(P⁻¹H) either",
            )
    if kind.overridden:
        return StabilityThreshold(None, f"none: {kind.why_none}")
    if kind.rule in _NO_BOUND:
        return StabilityThreshold(None, f"none: {_NO_BOUND[kind.rule]}")
    if group is not None:
        numbered = [numbered[group]]
    if kind.rule in ("SGD", "ASGD"):
        per = [
            _still()
            if _frozen(g)
            else asgd_threshold(inner or optimizer, g)
            if kind.rule == "ASGD"
            else stability_threshold(
                _num(g["lr"]),
                _num(g.get("momentum", 0.0)),
                nesterov=bool(g.get("nesterov", False)),
                dampening=_num(g.get("dampening", 0.0)),
                weight_decay=_num(g.get("weight_decay", 0.0)),
            )
            for _, g in numbered
        ]
        t = _most_restrictive(per, name)
        if group is not None and t.group is not None:
            return StabilityThreshold(t.value, t.rule.replace("group 0", f"group {group}"), group)
        return t
    if kind.rule in PRECONDITIONED:
        return StabilityThreshold(
            None, f"none: {name} is adaptive (preconditioned steps); see λ1(P⁻¹H)"
        )
    if kind.rule in _ADAPTIVE:  # no λ1(P⁻¹H) for it either (preconditioned_threshold_for)
        return StabilityThreshold(
            None,
            f"none: {name} is adaptive (its steps are preconditioned by its state), so λ1_H has "
            "no bound of its own; the preconditioned sharpness and its bound are measured for "
            "Adam, AdamW, Adamax, NAdam, RAdam, SparseAdam, RMSprop, Adagrad and Adadelta only",
        )
    if why := no_bound_reason(optimizer):
        return StabilityThreshold(None, f"none: {why}")
    if inner_name := _wrapped_name(optimizer):
        return StabilityThreshold(
            None,
            f"none: {name} wraps {inner_name} and steps in its own way, so {inner_name}'s "
            "bound is not assumed",
        )
    return StabilityThreshold(None, f"none: no stability rule known for {name}")


def asgd_threshold(optimizer: torch.optim.Optimizer, g: dict[str, Any]) -> StabilityThreshold:
    """ASGD's bound for param group ``g``: 2/η_t − wd − λ.

    torch's ASGD steps θ ← (1 − λ η_t) θ − η_t (∇f + wd θ), with η_t = lr/(1 + λ·lr·t)^α kept in
    each parameter's state (``eta``, the step size of its next step; the one the last step used
    differs by a factor (1 + λ·lr/(1 + λ·lr·t))^α, < 1e-5 at the defaults). On curvature h the
    factor is 1 − η_t (h + wd + λ): stable iff h < 2/η_t − wd − λ. The largest η_t of the
    group's parameters decides; before any step η_t = lr.
    """
    lr = _num(g["lr"])
    etas = [
        _num(optimizer.state[q]["eta"])
        for q in g.get("params", ())
        if "eta" in optimizer.state.get(q, {})
    ]
    eta = max(etas) if etas else lr
    if lr == 0 or eta == 0:
        return _still()
    if eta < 0:
        return StabilityThreshold(None, f"none: non-positive step size η_t = {eta}")
    value = 2.0 / eta - _num(g.get("weight_decay", 0.0)) - _num(g.get("lambd", 0.0))
    rule = (
        f"2/η_t - wd - λ, η_t = lr/(1+λ·lr·t)^α = {eta:.4g} (ASGD's decayed step size; the lr "
        "column is the group's lr)"
    )
    return StabilityThreshold(value, rule)


def _wrapped_name(optimizer: Any) -> str:
    for attr in ("base_optimizer", "optimizer", "_optimizer"):
        inner = getattr(optimizer, attr, None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
            return type(inner).__name__
    return ""
