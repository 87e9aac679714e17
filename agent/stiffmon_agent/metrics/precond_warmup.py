"""When λ1(P⁻¹H) of Adam / AdamW / Adamax / NAdam / RAdam / SparseAdam / RMSprop / Adadelta is
not yet compared with its threshold (Adagrad: at once, it has no momentum and its P is its sum
of squared gradients so far, the one its next step divides by).

Their bounds (:mod:`~stiffmon_agent.metrics.thresholds`) assume a steady momentum average and a
steady average of squared gradients, which the first steps do not have (:func:`momentum_warmup`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from stiffmon_agent.metrics.optimizer_kind import PRECONDITIONED, optimizer_kind
from stiffmon_agent.metrics.optimizer_kind import number as _num


def radam_rectification(t: float, b2: float) -> float | None:
    """RAdam's r_t at step t (ρ_t = ρ_∞ − 2tβ2^t/(1−β2^t), ρ_∞ = 2/(1−β2) − 1), or None while
    ρ_t ≤ 5 (its step is then SGD with momentum on the bias-corrected m)."""
    rho_inf = 2 / (1 - b2) - 1
    rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
    if rho <= 5:
        return None
    return math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))


def _rectified_at(b2: float) -> int:
    """The first step t at which RAdam rectifies (ρ_t > 5), 0 if it never does (ρ_∞ ≤ 5)."""
    if 2 / (1 - b2) - 1 <= 5:
        return 0
    t = 1
    while radam_rectification(t, b2) is None and t < 100_000:
        t += 1
    return t


def momentum_warmup(
    optimizer: torch.optim.Optimizer, groups: Sequence[dict[str, Any]] | None = None
) -> str:
    """Why λ1(P⁻¹H) of Adam-like optimizers / RMSprop is not yet compared with its threshold, or "".

    Adam's threshold (2+2β1)/((1−β1)η) is for a steady momentum average m ← β1 m + (1−β1) g.
    Adam's first steps divide it by 1 − β1^t instead (at t = 1 the step is η g / |g|), and P
    folds that factor in (:func:`diagonal_preconditioner`), so before t ≈ 1/(1−β1) steps
    λ1(P⁻¹H) overstates the steady-state criterion (up to 1/(1−β1) = 10× at t = 1, β1 = 0.9):
    a spike above the threshold there is no edge of stability. RMSprop has no bias correction:
    v ← α v + (1−α) g² from 0 is (1 − α^t) of its steady value, so P = √v + ε is small at first
    and λ1(P⁻¹H) up to 1/√(1−α) = 10× at t = 1, α = 0.99 (a false step-0 catapult on a run
    whose λ1_H rose steadily); it waits t ≈ 1/(1−α) steps. Adamax, NAdam and RAdam wait for
    their momentum as Adam does (NAdam's c1, c2 are in its bound), RAdam also for its
    rectification (ρ_t > 5; P switches from (1 − β1^t)·I there); SparseAdam as Adam. Adadelta's
    two averages (of g² and of Δ², decay ρ, no bias correction) wait t ≈ 1/(1−ρ) as RMSprop's.
    Adagrad does not wait. t is the fewest steps any parameter has taken.
    """
    name = optimizer_kind(optimizer).rule
    if name not in PRECONDITIONED or name == "Adagrad":
        return ""
    gs = list(groups if groups is not None else optimizer.param_groups)

    def key(g: dict[str, Any]) -> float:
        if name == "Adadelta":
            return _num(g["rho"])
        return _num(g["alpha"]) if name == "RMSprop" else _num(g["betas"][0])

    need = max(math.ceil(round(1 / (1 - key(g)), 6)) for g in gs) if gs else 0
    steps = [
        _num(optimizer.state[q]["step"])
        for g in optimizer.param_groups
        for q in g["params"]
        if "step" in optimizer.state.get(q, {})
    ]
    t = int(min(steps)) if steps else 0
    if name == "RAdam":  # P switches from (1 − β1^t)·I once rectified (ρ_t > 5)
        rect = max((_rectified_at(_num(g["betas"][1])) for g in gs), default=0)
        if t < rect:
            return (
                f"RAdam has taken {t} step(s); its variance rectification starts at step {rect} "
                "(ρ_t > 5): its steps are SGD with momentum until then"
            )
    if t >= need:
        return ""
    if name in ("RMSprop", "Adadelta"):
        return (
            f"{name} has taken {t} step(s); its average of squared gradients (no bias "
            f"correction) reaches the steady state the threshold assumes after about "
            f"1/(1-{'ρ' if name == 'Adadelta' else 'α'}) = {need} steps; published from then on"
        )
    return (
        f"{name} has taken {t} step(s); its momentum average reaches the steady state that "
        f"{'its bound' if name == 'NAdam' else '(2+2β1)/((1-β1)η)'} assumes after about "
        f"1/(1-β1) = {need} steps; published from then on"
    )
