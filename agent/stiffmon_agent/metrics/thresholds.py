r"""Stability thresholds of optimizers, and the diagonal preconditioner of adaptive ones.

A quadratic with curvature λ is stable under an optimizer iff λ is below its threshold. With
learning rate η (of the param group, at the step being measured: schedules are followed):

* SGD: 2/η; heavy-ball momentum β: (2 + 2β)/η; Nesterov momentum β: (2 + 2β)/((1 + 2β) η).
  ``dampening`` τ scales the gradient by (1 − τ), i.e. η by (1 − τ). Coupled ``weight_decay``
  wd adds wd·θ to the gradient, so the curvature the optimizer sees is λ + wd: the threshold on
  λ1_H is the bound minus wd.
* Adam / AdamW: the preconditioned sharpness λ1(P⁻¹H) with
  P = (1 − β1^t)·diag(√(v_t / (1 − β2^t)) + ε) (``max_exp_avg_sq`` for amsgrad) against
  (2 + 2β1)/((1 − β1) η) (Cohen et al. 2022, "Adaptive Gradient Methods at the Edge of
  Stability"): with P frozen, Adam is EMA momentum on P⁻¹H. AdamW's decoupled decay (also
  Adam's ``decoupled_weight_decay=True``) θ ← (1 − η wd) θ − η m/P lowers the bound by the
  factor (1 − η wd/2), applied: with a = λ(P⁻¹H) the iteration's characteristic polynomial
  z² − (β1 + c − η(1−β1)a) z + β1 c, c = 1 − η wd, has its root at −1 where
  η(1−β1)a = (1+β1)(1+c) (on a quadratic the real AdamW diverges at 92.62 where the bound
  without the factor says 95.00, η wd = 0.05). Adam's (and RMSprop's) coupled L2 is not
  included: it adds wd·P⁻¹ to P⁻¹H, which is no shift of λ1(P⁻¹H) (it grows where P is small).
* Adamax: θ ← θ − η m/((1 − β1^t) u), u = max(β2 u, |g| + ε) (``exp_inf``, ε inside):
  P = (1 − β1^t)·diag(u), Adam's bound (2 + 2β1)/((1 − β1) η) (coupled L2 only).
* RAdam: once rectified (ρ_t > 5) Adam with P = (1 − β1^t)·diag(√v_t + ε)/(r_t √(1 − β2^t))
  (torch adds ε before the bias correction; the rectification r_t, → 1, is folded into P);
  before, SGD with momentum on the bias-corrected m: P = (1 − β1^t)·I. Adam's bound, with
  AdamW's factor for ``decoupled_weight_decay``.
* NAdam: θ ← θ − η (c1 g + c2 m)/P, P = diag(√(v_t/(1 − β2^t)) + ε), c1 = (1 − μ_t)/(1 − Π_t),
  c2 = μ_{t+1}/(1 − Π_{t+1}), μ_t = β1(1 − ½·0.96^(t ψ)) (ψ = ``momentum_decay``, Π_t = ∏μ
  = ``mu_product``). With the coefficients frozen (those of the last step) the root at −1 gives
  2(1 + β1)/(η((1 + β1) c1 + (1 − β1) c2)): late (Π → 0, μ → β1 after ~3e4 steps at ψ = 4e-3)
  (2 + 2β1)/((1 − β1)(1 + 2β1) η); decoupled decay multiplies it by (1 − η wd/2).
* RMSprop: P = diag(√v_t + ε) (√(v_t − ḡ_t²) + ε when centred), heavy-ball momentum μ on P⁻¹H:
  (2 + 2μ)/η.
* ASGD: before its averaging starts (t0) and after, the iterate steps θ ← (1 − λ η_t) θ − η_t g
  with the decayed step size η_t = lr/(1 + λ·lr·t)^α of its state (``eta``), not the group's lr:
  2/η_t − wd − λ (λ = ``lambd``; the averaging does not feed back into the iterate).

A subclass of one of these that keeps its ``step`` gets its rule; one that overrides ``step``
gets none (:mod:`~stiffmon_agent.metrics.optimizer_kind`).

With several param groups the most restrictive group decides; ``group`` says which.

``maximize=True`` (gradient ascent on the loss f) is descent on −f: the thresholds hold for the
Hessian of −f, which the agent measures for such an optimizer (:func:`maximizes`); param groups
that differ in ``maximize`` descend no single objective, and have no threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from stiffmon_agent.metrics.optimizer_kind import PRECONDITIONED, TORCH_ADAPTIVE, optimizer_kind
from stiffmon_agent.metrics.optimizer_kind import number as _num
from stiffmon_agent.metrics.precond_warmup import momentum_warmup as momentum_warmup
from stiffmon_agent.metrics.precond_warmup import radam_rectification

_ADAPTIVE = TORCH_ADAPTIVE | {"Lion", "Adan", "Shampoo"}  # and others' by name


@dataclass(frozen=True)
class StabilityThreshold:
    """The largest stable curvature for an optimizer, or why there is none.

    Attributes:
        value: The threshold, or None when no threshold applies or it cannot be known.
        rule: How it was computed, e.g. ``"2/η - wd (SGD, group 1)"``, or why there is none.
        group: Index of the most restrictive param group (None when there is no value).
        preconditioned: The threshold applies to λ1(P⁻¹H) rather than to λ1_H.
        still: The group does not move (learning rate 0, or every parameter frozen by
            ``requires_grad=False``), so it sets no bound: it is left out of the most
            restrictive one.
    """

    value: float | None
    rule: str
    group: int | None = None
    preconditioned: bool = False
    still: bool = False


def maximizes(optimizer: torch.optim.Optimizer | None) -> bool | None:
    """Whether the optimizer ascends the loss (``maximize=True`` in every param group): True;
    in none (or no optimizer): False; None where the groups differ."""
    if optimizer is None:
        return False
    flags = {bool(g.get("maximize", False)) for g in optimizer.param_groups}
    return None if len(flags) > 1 else flags == {True}


_MIXED = "none: the param groups differ in maximize (no single objective descended)"


def _still() -> StabilityThreshold:
    return StabilityThreshold(None, "none: η = 0 (the group does not move)", still=True)


def _frozen(g: dict[str, Any]) -> bool:
    """A group whose parameters all have ``requires_grad=False`` (frozen layers of progressive
    unfreezing, held by the optimizer from the start): they get no gradient, and torch's
    optimizers skip a parameter without one, so the group does not move, whatever its η."""
    ps = g.get("params") or ()
    return bool(ps) and all(isinstance(q, Tensor) and not q.requires_grad for q in ps)


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


def _most_restrictive(
    per_group: list[StabilityThreshold], name: str, preconditioned: bool = False
) -> StabilityThreshold:
    moving = [(i, t) for i, t in enumerate(per_group) if not t.still]
    if not moving:
        return StabilityThreshold(None, f"none: η = 0 in every group ({name}): nothing moves")
    unknown = next((i for i, t in moving if t.value is None), None)
    if unknown is not None:
        return StabilityThreshold(None, f"{per_group[unknown].rule} ({name}, group {unknown})")
    value, i, rule = min((t.value, i, t.rule) for i, t in moving if t.value is not None)
    return StabilityThreshold(value, f"{rule} ({name}, group {i})", i, preconditioned)


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
            "Adam, AdamW, Adamax, NAdam, RAdam and RMSprop only",
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
    rule = "2/η_t - wd - λ, η_t = lr/(1+λ·lr·t)^α (ASGD's decayed step size, not lr)"
    return StabilityThreshold(value, rule)


def preconditioned_threshold_for(
    optimizer: torch.optim.Optimizer, groups: Sequence[dict[str, Any]] | None = None
) -> StabilityThreshold:
    """Threshold on λ1(P⁻¹H) for Adam / AdamW / Adamax / RAdam ((2+2β1)/((1−β1)η)), NAdam
    (:func:`nadam_coefficients`) and RMSprop ((2+2μ)/η);
    ``groups`` as in :func:`stability_threshold_for`."""
    kind = optimizer_kind(optimizer)
    name = kind.rule
    if kind.overridden:
        return StabilityThreshold(None, f"none: {kind.why_none}")
    if name not in PRECONDITIONED:
        return StabilityThreshold(None, f"none: no preconditioned rule known for {kind.label}")
    if maximizes(optimizer) is None:
        return StabilityThreshold(None, f"{_MIXED} ({kind.label})")
    per = []
    for g in groups if groups is not None else optimizer.param_groups:
        eta = _num(g["lr"])
        if eta == 0 or _frozen(g):
            per.append(_still())
        elif eta < 0:
            per.append(StabilityThreshold(None, f"none: non-positive learning rate {eta}"))
        elif name == "RMSprop":
            mu = _num(g.get("momentum", 0.0))
            per.append(StabilityThreshold((2 + 2 * mu) / eta, "(2+2μ)/η" if mu else "2/η"))
        else:
            b1 = _num(g["betas"][0])
            value, rule = (2 + 2 * b1) / ((1 - b1) * eta), "(2+2β1)/((1-β1)η)"
            if name == "NAdam":
                c1, c2 = nadam_coefficients(optimizer, g)
                value = 2 * (1 + b1) / (eta * ((1 + b1) * c1 + (1 - b1) * c2))
                rule = "2(1+β1)/(η((1+β1)c1+(1-β1)c2)), c1 = (1-μ_t)/(1-Π_t), c2 = μ_t+1/(1-Π_t+1)"
            wd = _num(g.get("weight_decay", 0.0))
            if wd and (name == "AdamW" or g.get("decoupled_weight_decay")):
                value, rule = max(0.0, value * (1 - eta * wd / 2)), rule + "·(1-η·wd/2)"
            per.append(StabilityThreshold(value, rule))
    return _most_restrictive(per, kind.label, preconditioned=True)


def _nadam_mu(b1: float, psi: float, t: float) -> float:
    return b1 * (1.0 - 0.5 * 0.96 ** (t * psi))


def nadam_coefficients(optimizer: torch.optim.Optimizer, g: dict[str, Any]) -> tuple[float, float]:
    """NAdam's (c1, c2) of group ``g`` at its last step t (state ``step``, ``mu_product`` Π_t):
    c1 = (1 − μ_t)/(1 − Π_t), c2 = μ_{t+1}/(1 − Π_t μ_{t+1}); the parameter with the largest
    (1+β1) c1 + (1−β1) c2 (the lowest bound) decides. Before any step, those of step 1."""
    b1, psi = _num(g["betas"][0]), _num(g.get("momentum_decay", 4e-3))
    cs = []
    states = [optimizer.state.get(q, {}) for q in g.get("params", ())]
    for st in [st for st in states if "step" in st] or [{}]:
        t = _num(st.get("step", 1.0))
        mu, nxt = _nadam_mu(b1, psi, t), _nadam_mu(b1, psi, t + 1)
        prod = _num(st.get("mu_product", mu))
        cs.append(((1 - mu) / (1 - prod), nxt / (1 - prod * nxt)))
    return max(cs, key=lambda c: (1 + b1) * c[0] + (1 - b1) * c[1])


def _lr_scales(optimizer: torch.optim.Optimizer, name: str) -> dict[int, float]:
    """η_max/η_g by ``id`` of each param group g (∞ for η_g = 0: it does not move), where the
    moving groups differ in η but share the momentum (β1; RMSprop: μ); {} otherwise."""
    lrs = {id(g): _num(g["lr"]) for g in optimizer.param_groups}
    moving = [g for g in optimizer.param_groups if lrs[id(g)] > 0 and not _frozen(g)]
    top = max((lrs[id(g)] for g in moving), default=0.0)
    if not moving or all(lrs[id(g)] == top for g in optimizer.param_groups):
        return {}
    if name == "RMSprop":
        momenta = {_num(g.get("momentum", 0.0)) for g in moving}
    else:
        momenta = {(_num(g["betas"][0]), _num(g.get("momentum_decay", 0))) for g in moving}
    if len(momenta) > 1:
        return {}
    return {k: top / v if v > 0 else math.inf for k, v in lrs.items()}


def diagonal_preconditioner(
    optimizer: torch.optim.Optimizer, params: list[nn.Parameter]
) -> tuple[Tensor | None, str]:
    """The diagonal P of Adam / AdamW / Adamax / NAdam / RAdam / RMSprop at its current step,
    flattened over ``params``.

    Parameters the optimizer does not hold get P = ∞ (they do not move, so they drop out of
    P⁻¹H), and so do held ones without state once others have some: torch's optimizers skip a
    parameter whose gradient is None (an unused branch, a layer that got none yet), so it has
    not moved, and those of a group with η = 0.

    Param groups of different η (layer-wise learning rates) step θ_g ← θ_g − η_g m_g/P_g =
    θ_g − η_max m_g/(P_g η_max/η_g): with P_g scaled by η_max/η_g (:func:`_lr_scales`) the
    whole iteration is the largest-η group's on P⁻¹H, and that group's bound (the one
    :func:`preconditioned_threshold_for` picks) is exact, where the groups share β1 (RMSprop:
    μ). Groups that differ in it keep P unscaled: the most restrictive group's bound against
    the whole λ1(P⁻¹H) is then only sufficient.

    Returns:
        (P, "") or (None, why P cannot be read: another optimizer, no step taken yet, ...).
    """
    kind = optimizer_kind(optimizer)
    name = kind.rule
    if kind.overridden or name not in PRECONDITIONED:
        return None, kind.why_none or f"{name} has no diagonal preconditioner rule"
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    if params and not any(id(p) in group_of for p in params):  # P = ∞ everywhere: P⁻¹H = 0
        return None, "the optimizer holds none of the model's parameters (an EMA copy?)"
    stepped = any(optimizer.state.get(p) for p in params if id(p) in group_of)
    scales = _lr_scales(optimizer, name)
    parts: list[Tensor] = []
    for p in params:
        g = group_of.get(id(p))
        st = optimizer.state.get(p, {}) if g is not None else {}
        scale = scales.get(id(g), 1.0)
        if g is None or (stepped and not st) or math.isinf(scale):
            parts.append(torch.full((p.numel(),), math.inf, dtype=p.dtype, device=p.device))
            continue
        eps = _num(g["eps"])
        if name == "RMSprop":
            if "square_avg" not in st:
                return None, "no optimizer state yet (before the first step)"
            v = st["square_avg"]
            if g.get("centered") and "grad_avg" in st:
                v = v - st["grad_avg"] ** 2
            d = v.clamp_min(0).sqrt() + eps
        else:
            key = "max_exp_avg_sq" if g.get("amsgrad") else "exp_avg_sq"
            key = "exp_inf" if name == "Adamax" else key
            if key not in st or "step" not in st or _num(st["step"]) < 1:
                return None, "no optimizer state yet (before the first step)"
            t = _num(st["step"])
            b1, b2 = _num(g["betas"][0]), _num(g["betas"][1])
            d = _adam_like_p(name, st[key], t, b1, b2, eps)
        parts.append((d.detach() * scale if scale != 1.0 else d.detach()).reshape(-1).to(p.dtype))
    if not parts:
        return None, "no parameters"
    return torch.cat(parts), ""


def _adam_like_p(name: str, v: Tensor, t: float, b1: float, b2: float, eps: float) -> Tensor:
    """P of Adam / AdamW / Adamax / NAdam / RAdam from the second-moment state ``v`` (Adamax:
    ``exp_inf``) at step t (the module docstring states each)."""
    if name == "Adamax":
        return (1 - b1**t) * v
    if name == "NAdam":
        return (v / (1 - b2**t)).clamp_min(0).sqrt() + eps
    if name == "RAdam":
        r = radam_rectification(t, b2)
        if r is None:
            return torch.full_like(v, 1 - b1**t)
        return (1 - b1**t) * (v.clamp_min(0).sqrt() + eps) / (r * math.sqrt(1 - b2**t))
    return (1 - b1**t) * ((v / (1 - b2**t)).clamp_min(0).sqrt() + eps)
