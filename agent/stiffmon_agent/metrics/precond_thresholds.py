r"""Stability thresholds on λ1(P⁻¹H) of the adaptive optimizers (P:
:mod:`~stiffmon_agent.metrics.preconditioner`).

With P frozen, each is (momentum) gradient descent on P⁻¹H, so a quadratic is stable iff
λ1(P⁻¹H) is below (η the group's step size at the step being measured):

* Adam / AdamW / Adamax / RAdam / SparseAdam: (2 + 2β1)/((1 − β1) η) (Cohen et al. 2022,
  "Adaptive Gradient Methods at the Edge of Stability": EMA momentum). Decoupled decay
  (AdamW; ``decoupled_weight_decay=True``) θ ← (1 − η wd) θ − η m/P lowers it by the factor
  (1 − η wd/2): with a = λ(P⁻¹H) the characteristic polynomial
  z² − (β1 + c − η(1−β1)a) z + β1 c, c = 1 − η wd, has its root at −1 where
  η(1−β1)a = (1+β1)(1+c) (the real AdamW diverges at 92.62 where 95.00 without the factor,
  η wd = 0.05). SparseAdam updates only the rows a step's gradient has (lazily): the bound
  holds for rows present at every step.
* NAdam: θ ← θ − η (c1 g + c2 m)/P, c1 = (1 − μ_t)/(1 − Π_t), c2 = μ_{t+1}/(1 − Π_{t+1}),
  μ_t = β1(1 − ½·0.96^(t ψ)); with the coefficients frozen the root at −1 gives
  2(1 + β1)/(η((1 + β1) c1 + (1 − β1) c2)) (→ (2 + 2β1)/((1 − β1)(1 + 2β1) η) late).
* RMSprop: heavy-ball momentum μ on P⁻¹H: (2 + 2μ)/η.
* Adagrad: θ ← θ − η_t g/(√s + ε), η_t = lr/(1 + (t − 1)·lr_decay): 2/η_t (no momentum;
  ``initial_accumulator_value`` is in s, so in P).
* Adadelta: θ ← θ − lr·(√(u + ε)/√(v + ε))·g: 2/lr.

Coupled L2 is not a shift of the bound: the measured operator is P⁻¹(H + wd) instead
(:func:`~stiffmon_agent.metrics.preconditioner.coupled_decay`), and the rule says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from stiffmon_agent.metrics.optimizer_kind import PRECONDITIONED, optimizer_kind
from stiffmon_agent.metrics.optimizer_kind import number as _num
from stiffmon_agent.metrics.preconditioner import decays_coupled, group_eta
from stiffmon_agent.metrics.threshold_base import (
    MIXED,
    StabilityThreshold,
    frozen,
    maximizes,
    most_restrictive,
    still,
)

L2_NOTE = " on λ1(P⁻¹(H+wd)), coupled L2"


def preconditioned_threshold_for(
    optimizer: torch.optim.Optimizer, groups: Sequence[dict[str, Any]] | None = None
) -> StabilityThreshold:
    """Threshold on λ1(P⁻¹H) (the module docstring states each rule); ``groups``: the param
    groups' values to use (those the last step used), None: the optimizer's as they are."""
    kind = optimizer_kind(optimizer)
    name = kind.rule
    if kind.overridden:
        return StabilityThreshold(None, f"none: {kind.why_none}")
    if name not in PRECONDITIONED:
        return StabilityThreshold(None, f"none: no preconditioned rule known for {kind.label}")
    if maximizes(optimizer) is None:
        return StabilityThreshold(None, f"{MIXED} ({kind.label})")
    per = []
    for g in groups if groups is not None else optimizer.param_groups:
        eta = group_eta(optimizer, g, name)
        if eta == 0 or frozen(g):
            per.append(still())
            continue
        if eta < 0:
            per.append(StabilityThreshold(None, f"none: non-positive learning rate {eta}"))
            continue
        value, rule = _group_bound(optimizer, g, name, eta)
        wd = _num(g.get("weight_decay", 0.0))
        if wd and (name == "AdamW" or g.get("decoupled_weight_decay")):
            value, rule = max(0.0, value * (1 - eta * wd / 2)), rule + "·(1-η·wd/2)"
        elif decays_coupled(name, g):
            rule += L2_NOTE
        per.append(StabilityThreshold(value, rule))
    return most_restrictive(per, kind.label, preconditioned=True)


def _group_bound(
    optimizer: torch.optim.Optimizer, g: dict[str, Any], name: str, eta: float
) -> tuple[float, str]:
    if name == "RMSprop":
        mu = _num(g.get("momentum", 0.0))
        return (2 + 2 * mu) / eta, "(2+2μ)/η" if mu else "2/η"
    if name == "Adagrad":
        if _num(g.get("lr_decay", 0.0)):
            return 2 / eta, f"2/η_t, η_t = lr/(1+(t-1)·lr_decay) = {eta:.4g} (not lr)"
        return 2 / eta, "2/η"
    if name == "Adadelta":
        return 2 / eta, "2/η"
    b1 = _num(g["betas"][0])
    if name == "NAdam":
        c1, c2 = nadam_coefficients(optimizer, g)
        return (
            2 * (1 + b1) / (eta * ((1 + b1) * c1 + (1 - b1) * c2)),
            "2(1+β1)/(η((1+β1)c1+(1-β1)c2)), c1 = (1-μ_t)/(1-Π_t), c2 = μ_t+1/(1-Π_t+1)",
        )
    return (2 + 2 * b1) / ((1 - b1) * eta), "(2+2β1)/((1-β1)η)"


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
