"""The result type of the stability thresholds and what every rule shares: the most restrictive
param group, groups that do not move, and ``maximize``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


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


MIXED = "none: the param groups differ in maximize (no single objective descended)"


def still() -> StabilityThreshold:
    """A group that does not move (η = 0): it sets no bound."""
    return StabilityThreshold(None, "none: η = 0 (the group does not move)", still=True)


def frozen(g: dict[str, Any]) -> bool:
    """A group whose parameters all have ``requires_grad=False`` (frozen layers of progressive
    unfreezing, held by the optimizer from the start): they get no gradient, and torch's
    optimizers skip a parameter without one, so the group does not move, whatever its η."""
    ps = g.get("params") or ()
    return bool(ps) and all(isinstance(q, Tensor) and not q.requires_grad for q in ps)


def most_restrictive(
    per_group: list[StabilityThreshold], name: str, preconditioned: bool = False
) -> StabilityThreshold:
    """The smallest threshold of the moving groups, its rule naming ``name`` and the group;
    None (with the group's reason) where a moving group has none."""
    moving = [(i, t) for i, t in enumerate(per_group) if not t.still]
    if not moving:
        return StabilityThreshold(None, f"none: η = 0 in every group ({name}): nothing moves")
    unknown = next((i for i, t in moving if t.value is None), None)
    if unknown is not None:
        return StabilityThreshold(None, f"{per_group[unknown].rule} ({name}, group {unknown})")
    value, i, rule = min((t.value, i, t.rule) for i, t in moving if t.value is not None)
    return StabilityThreshold(value, f"{rule} ({name}, group {i})", i, preconditioned)
