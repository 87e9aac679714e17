r"""The diagonal preconditioner P of the adaptive optimizers, read from their state, and the
coupled L2 decay that enters their preconditioned curvature.

With P frozen at its current value each of these optimizers steps θ ← θ − η·(momentum of
P⁻¹∇f) (:mod:`~stiffmon_agent.metrics.precond_thresholds` gives the bounds):

* Adam / AdamW: P = (1 − β1^t)·diag(√(v_t/(1 − β2^t)) + ε) (``max_exp_avg_sq`` for amsgrad);
* Adamax: (1 − β1^t)·diag(u_t) (``exp_inf``, ε inside);
* RAdam: (1 − β1^t)·diag(√v_t + ε)/(r_t √(1 − β2^t)) once rectified, (1 − β1^t)·I before;
* NAdam: diag(√(v_t/(1 − β2^t)) + ε);
* SparseAdam: (1 − β1^t)·diag(√v_t + ε)/√(1 − β2^t) (ε before the bias correction);
* RMSprop: diag(√v_t + ε) (√(v_t − ḡ_t²) + ε centred);
* Adagrad: diag(√s_t + ε), s_t = ``initial_accumulator_value`` + Σ g² (``sum``);
* Adadelta: diag(√(v_t + ε)/√(u_t + ε)) (``square_avg`` v, ``acc_delta`` u: its step is
  lr·√(u + ε)/√(v + ε)·g).

Coupled L2 (``weight_decay`` of all but AdamW, Adam/NAdam/RAdam with
``decoupled_weight_decay=True``) adds wd·θ to the gradient before it is averaged and
preconditioned, so the optimizer steps on P⁻¹(H + wd·I): its curvature is
λ1(P^{-1/2}(H + wd)P^{-1/2}), which is no shift of λ1(P⁻¹H) (wd/P grows where P is small);
:func:`coupled_decay` gives the flat wd that the measurement adds (on a quadratic with P = 1
torch's Adam at wd = 5 diverges 5.0 lower than without it).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from stiffmon_agent.metrics.optimizer_kind import PRECONDITIONED, optimizer_kind
from stiffmon_agent.metrics.optimizer_kind import number as _num
from stiffmon_agent.metrics.precond_warmup import radam_rectification
from stiffmon_agent.metrics.threshold_base import frozen

DECOUPLED = frozenset({"AdamW"})
"""Rules whose ``weight_decay`` is always decoupled (Adam, NAdam, RAdam: when their group has
``decoupled_weight_decay``; SparseAdam has none)."""


def decays_coupled(name: str, g: dict[str, Any]) -> float:
    """The coupled L2 coefficient wd of param group ``g`` under rule ``name`` (0 if none or
    decoupled)."""
    if name in DECOUPLED or g.get("decoupled_weight_decay"):
        return 0.0
    return _num(g.get("weight_decay", 0.0))


def group_steps(optimizer: torch.optim.Optimizer, g: dict[str, Any]) -> list[float]:
    """The ``step`` counts of the group's parameters that have state."""
    states = [optimizer.state.get(q, {}) for q in g.get("params", ())]
    return [_num(st["step"]) for st in states if "step" in st]


def group_eta(optimizer: torch.optim.Optimizer, g: dict[str, Any], name: str) -> float:
    """The step size η of group ``g``: its ``lr``; Adagrad's η_t = lr/(1 + (t − 1)·lr_decay)
    at the last step t (the fewest steps of its parameters, the largest η_t; t = 1 before)."""
    lr = _num(g["lr"])
    if name != "Adagrad" or not _num(g.get("lr_decay", 0.0)):
        return lr
    t = min(group_steps(optimizer, g), default=1.0)
    return lr / (1 + (t - 1) * _num(g["lr_decay"]))


def _momentum_of(g: dict[str, Any], name: str) -> Any:
    if name == "RMSprop":
        return _num(g.get("momentum", 0.0))
    if name in ("Adagrad", "Adadelta"):
        return 0.0
    return (_num(g["betas"][0]), _num(g.get("momentum_decay", 0)))


def lr_scales(optimizer: torch.optim.Optimizer, name: str) -> dict[int, float]:
    """η_max/η_g by ``id`` of each param group g (∞ for η_g = 0: it does not move), where the
    moving groups differ in η but share the momentum (β1; RMSprop: μ); {} otherwise."""
    lrs = {id(g): group_eta(optimizer, g, name) for g in optimizer.param_groups}
    moving = [g for g in optimizer.param_groups if lrs[id(g)] > 0 and not frozen(g)]
    top = max((lrs[id(g)] for g in moving), default=0.0)
    if not moving or all(lrs[id(g)] == top for g in optimizer.param_groups):
        return {}
    if len({_momentum_of(g, name) for g in moving}) > 1:
        return {}
    return {k: top / v if v > 0 else math.inf for k, v in lrs.items()}


def coupled_decay(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> Tensor | None:
    """The coupled L2 coefficient of each of ``params``' entries, flattened (0 where the
    optimizer does not hold it or its decay is decoupled); None where all are 0."""
    name = optimizer_kind(optimizer).rule
    wd_of = {id(p): decays_coupled(name, g) for g in optimizer.param_groups for p in g["params"]}
    if not any(wd_of.get(id(p), 0.0) for p in params):
        return None
    return torch.cat(
        [
            torch.full((p.numel(),), wd_of.get(id(p), 0.0), dtype=p.dtype, device=p.device)
            for p in params
        ]
    )


def diagonal_preconditioner(
    optimizer: torch.optim.Optimizer, params: list[nn.Parameter]
) -> tuple[Tensor | None, str]:
    """The diagonal P of the optimizer (the module docstring states each) at its current step,
    flattened over ``params``.

    Parameters the optimizer does not hold get P = ∞ (they do not move, so they drop out of
    P⁻¹H), and so do held ones without state once others have some: torch's optimizers skip a
    parameter whose gradient is None (an unused branch, a layer that got none yet), so it has
    not moved, and those of a group with η = 0.

    Param groups of different η (layer-wise learning rates) step θ_g ← θ_g − η_g m_g/P_g =
    θ_g − η_max m_g/(P_g η_max/η_g): with P_g scaled by η_max/η_g (:func:`lr_scales`) the
    whole iteration is the largest-η group's on P⁻¹H, and that group's bound is exact, where
    the groups share β1 (RMSprop: μ). Groups that differ in it keep P unscaled: the most
    restrictive group's bound against the whole λ1(P⁻¹H) is then only sufficient.

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
    scales = lr_scales(optimizer, name)
    parts: list[Tensor] = []
    for p in params:
        g = group_of.get(id(p))
        st = optimizer.state.get(p, {}) if g is not None else {}
        scale = scales.get(id(g), 1.0)
        if g is None or (stepped and not st) or math.isinf(scale):
            parts.append(torch.full((p.numel(),), math.inf, dtype=p.dtype, device=p.device))
            continue
        d = _state_p(name, g, st)
        if d is None:
            return None, "no optimizer state yet (before the first step)"
        parts.append((d.detach() * scale if scale != 1.0 else d.detach()).reshape(-1).to(p.dtype))
    if not parts:
        return None, "no parameters"
    return torch.cat(parts), ""


def _state_p(name: str, g: dict[str, Any], st: dict[str, Any]) -> Tensor | None:
    """P of one parameter from its state ``st`` (None before its first step)."""
    eps = _num(g["eps"])
    if name == "RMSprop":
        if "square_avg" not in st:
            return None
        v = st["square_avg"]
        if g.get("centered") and "grad_avg" in st:
            v = v - st["grad_avg"] ** 2
        return v.clamp_min(0).sqrt() + eps
    if name == "Adagrad":
        return st["sum"].clamp_min(0).sqrt() + eps if "sum" in st else None
    if name == "Adadelta":
        if "square_avg" not in st or "acc_delta" not in st:
            return None
        return (st["square_avg"] + eps).sqrt() / (st["acc_delta"] + eps).sqrt()
    key = "max_exp_avg_sq" if g.get("amsgrad") else "exp_avg_sq"
    key = "exp_inf" if name == "Adamax" else key
    if key not in st or "step" not in st or _num(st["step"]) < 1:
        return None
    t = _num(st["step"])
    b1, b2 = _num(g["betas"][0]), _num(g["betas"][1])
    v = st[key]
    if v.is_sparse:
        v = v.to_dense()
    return _adam_like_p(name, v, t, b1, b2, eps)


def _adam_like_p(name: str, v: Tensor, t: float, b1: float, b2: float, eps: float) -> Tensor:
    """P of Adam / AdamW / Adamax / NAdam / RAdam / SparseAdam from the second-moment state
    ``v`` (Adamax: ``exp_inf``) at step t (the module docstring states each)."""
    if name == "Adamax":
        return (1 - b1**t) * v
    if name == "NAdam":
        return (v / (1 - b2**t)).clamp_min(0).sqrt() + eps
    if name == "SparseAdam":
        return (1 - b1**t) * (v.clamp_min(0).sqrt() + eps) / math.sqrt(1 - b2**t)
    if name == "RAdam":
        r = radam_rectification(t, b2)
        if r is None:
            return torch.full_like(v, 1 - b1**t)
        return (1 - b1**t) * (v.clamp_min(0).sqrt() + eps) / (r * math.sqrt(1 - b2**t))
    return (1 - b1**t) * ((v / (1 - b2**t)).clamp_min(0).sqrt() + eps)
