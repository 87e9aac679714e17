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
  Stability"): with P frozen, Adam is EMA momentum on P⁻¹H. Weight decay (Adam's coupled L2 or
  AdamW's decoupled shrinkage) is not included.
* RMSprop: P = diag(√v_t + ε) (√(v_t − ḡ_t²) + ε when centred), heavy-ball momentum μ on P⁻¹H:
  (2 + 2μ)/η.

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
_PRECONDITIONED = {"Adam", "AdamW", "RMSprop"}


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
    ps = g.get("params")
    return bool(ps) and all(isinstance(q, Tensor) and not q.requires_grad for q in ps)


def _num(x: object) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)  # type: ignore[arg-type]


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
    if type(optimizer).__name__ != "ZeroRedundancyOptimizer":
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
    name = type(optimizer).__name__
    if maximizes(optimizer) is None:
        return StabilityThreshold(None, f"{_MIXED} ({name})")
    numbered = list(enumerate(groups if groups is not None else optimizer.param_groups))
    inner = zero_inner(optimizer)
    if inner is not None:  # its global groups hold every parameter, its rule is the inner one's
        name = type(inner).__name__
        if name in _PRECONDITIONED | _ADAPTIVE:
            return StabilityThreshold(
                None,
                f"none: ZeroRedundancyOptimizer({name}) is adaptive and its state (P) is sharded "
                "over the ranks: no λ1(P⁻¹H) either",
            )
    if group is not None:
        numbered = [numbered[group]]
    if name == "SGD":
        per = [
            _still()
            if _frozen(g)
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
    if name in _PRECONDITIONED:
        return StabilityThreshold(
            None, f"none: {name} is adaptive (preconditioned steps); see λ1(P⁻¹H)"
        )
    if name in _ADAPTIVE:  # no λ1(P⁻¹H) for it either (preconditioned_threshold_for)
        return StabilityThreshold(
            None, f"none: {name} is adaptive (preconditioned steps); no stability rule known"
        )
    return StabilityThreshold(None, f"none: no stability rule known for {name}")


def preconditioned_threshold_for(
    optimizer: torch.optim.Optimizer, groups: Sequence[dict[str, Any]] | None = None
) -> StabilityThreshold:
    """Threshold on λ1(P⁻¹H) for Adam / AdamW ((2+2β1)/((1−β1)η)) and RMSprop ((2+2μ)/η);
    ``groups`` as in :func:`stability_threshold_for`."""
    name = type(optimizer).__name__
    if name not in _PRECONDITIONED:
        return StabilityThreshold(None, f"none: no preconditioned rule known for {name}")
    if maximizes(optimizer) is None:
        return StabilityThreshold(None, f"{_MIXED} ({name})")
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
            per.append(StabilityThreshold((2 + 2 * b1) / ((1 - b1) * eta), "(2+2β1)/((1-β1)η)"))
    return _most_restrictive(per, name, preconditioned=True)


def momentum_warmup(
    optimizer: torch.optim.Optimizer, groups: Sequence[dict[str, Any]] | None = None
) -> str:
    """Why λ1(P⁻¹H) of Adam / AdamW / RMSprop is not yet compared with its threshold, or "".

    Adam's threshold (2+2β1)/((1−β1)η) is for a steady momentum average m ← β1 m + (1−β1) g.
    Adam's first steps divide it by 1 − β1^t instead (at t = 1 the step is η g / |g|), and P
    folds that factor in (:func:`diagonal_preconditioner`), so before t ≈ 1/(1−β1) steps
    λ1(P⁻¹H) overstates the steady-state criterion (up to 1/(1−β1) = 10× at t = 1, β1 = 0.9):
    a spike above the threshold there is no edge of stability. RMSprop has no bias correction:
    v ← α v + (1−α) g² from 0 is (1 − α^t) of its steady value, so P = √v + ε is small at first
    and λ1(P⁻¹H) up to 1/√(1−α) = 10× at t = 1, α = 0.99 (a false step-0 catapult on a run
    whose λ1_H rose steadily); it waits t ≈ 1/(1−α) steps. t is the fewest steps any parameter
    has taken.
    """
    name = type(optimizer).__name__
    if name not in ("Adam", "AdamW", "RMSprop"):
        return ""
    gs = list(groups if groups is not None else optimizer.param_groups)
    key = (lambda g: _num(g["alpha"])) if name == "RMSprop" else (lambda g: _num(g["betas"][0]))
    need = max(math.ceil(round(1 / (1 - key(g)), 6)) for g in gs) if gs else 0
    steps = [
        _num(optimizer.state[q]["step"])
        for g in optimizer.param_groups
        for q in g["params"]
        if "step" in optimizer.state.get(q, {})
    ]
    t = int(min(steps)) if steps else 0
    if t >= need:
        return ""
    if name == "RMSprop":
        return (
            f"RMSprop has taken {t} step(s); its average of squared gradients (no bias "
            f"correction) reaches the steady state the threshold assumes after about "
            f"1/(1-α) = {need}"
        )
    return (
        f"{name} has taken {t} step(s); its momentum average reaches the steady state that "
        f"(2+2β1)/((1-β1)η) assumes after about 1/(1-β1) = {need}"
    )


def diagonal_preconditioner(
    optimizer: torch.optim.Optimizer, params: list[nn.Parameter]
) -> tuple[Tensor | None, str]:
    """The diagonal P of Adam / AdamW / RMSprop at its current step, flattened over ``params``.

    Parameters the optimizer does not hold get P = ∞ (they do not move, so they drop out of
    P⁻¹H), and so do held ones without state once others have some: torch's optimizers skip a
    parameter whose gradient is None (an unused branch, a layer that got none yet), so it has
    not moved.

    Returns:
        (P, "") or (None, why P cannot be read: another optimizer, no step taken yet, ...).
    """
    name = type(optimizer).__name__
    if name not in _PRECONDITIONED:
        return None, f"{name} has no diagonal preconditioner rule"
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    if params and not any(id(p) in group_of for p in params):  # P = ∞ everywhere: P⁻¹H = 0
        return None, "the optimizer holds none of the model's parameters (an EMA copy?)"
    stepped = any(optimizer.state.get(p) for p in params if id(p) in group_of)
    parts: list[Tensor] = []
    for p in params:
        g = group_of.get(id(p))
        st = optimizer.state.get(p, {}) if g is not None else {}
        if g is None or (stepped and not st):
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
            if key not in st or "step" not in st:
                return None, "no optimizer state yet (before the first step)"
            t = _num(st["step"])
            if t < 1:
                return None, "no optimizer state yet (before the first step)"
            b1, b2 = _num(g["betas"][0]), _num(g["betas"][1])
            d = (1 - b1**t) * ((st[key] / (1 - b2**t)).clamp_min(0).sqrt() + eps)
        parts.append(d.detach().reshape(-1).to(p.dtype))
    if not parts:
        return None, "no parameters"
    return torch.cat(parts), ""
