"""Which torch optimizer's update rule a given optimizer follows, for its stability threshold.

The thresholds (:mod:`~stiffmon_agent.metrics.thresholds`) are derived from the update of a
torch optimizer (``torch.optim.SGD``, ``Adam``, …), so they hold for any optimizer whose
``step()`` *is* that update. A subclass that does not override ``step`` (``class
MySGD(torch.optim.SGD): pass``, or one adding a method or a property) steps exactly as its
torch base, and gets its rule. A subclass that overrides ``step`` may do anything (clip, centre
or rescale the gradient, take two steps, …): its bound cannot be known, and assuming the base's
would be a silently wrong number, so it gets none, and the reason says why and how it could get
one (keep the base's ``step``).

torch wraps ``step`` for its hooks (``Optimizer._patch_step_function`` assigns a wrapped
``step`` to the subclass itself); the comparison unwraps both with :func:`inspect.unwrap`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

TORCH_ADAPTIVE = frozenset(
    {
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
        "Muon",
    }
)
"""``torch.optim``'s optimizers whose steps are preconditioned by their state (or a line search):
λ1_H has no bound of its own for them."""

RULED = frozenset({"SGD", "ASGD"}) | TORCH_ADAPTIVE
"""Names of the ``torch.optim`` classes whose update the thresholds module knows by name (a
rule, or a stated reason for none)."""

PRECONDITIONED = frozenset(
    {"Adam", "AdamW", "Adamax", "NAdam", "RAdam", "SparseAdam", "RMSprop", "Adagrad", "Adadelta"}
)
"""The rules whose sharpness is measured preconditioned, λ1(P⁻¹H) with P from the optimizer's
state (:func:`~stiffmon_agent.metrics.preconditioner.diagonal_preconditioner`)."""


def number(x: object) -> float:
    """A param-group or state value (``lr``, ``betas[0]``, ``step``, …) as a float: torch
    allows a tensor for several of them."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)  # type: ignore[arg-type]


@dataclass(frozen=True)
class OptimizerKind:
    """The update rule an optimizer follows.

    Attributes:
        rule: The name of the optimizer whose rule applies (``"SGD"`` for a subclass of
            ``torch.optim.SGD`` that keeps its ``step``; the optimizer's own class name else).
        label: How the rule strings name it: ``"SGD"``, or ``"MySGD: SGD's step"``.
        overridden: The ``torch.optim`` base whose ``step`` a subclass overrides (no rule
            applies), else "".
    """

    rule: str
    label: str
    overridden: str = ""

    @property
    def why_none(self) -> str:
        """Why a subclass that overrides ``step`` gets no threshold ("" if it does not)."""
        if not self.overridden:
            return ""
        return (
            f"{self.label} subclasses torch.optim.{self.overridden} but overrides step(), so its "
            f"update may not be {self.overridden}'s (a subclass that keeps "
            f"{self.overridden}.step gets its bound)"
        )


def _raw_step(cls: type) -> Any:
    return inspect.unwrap(getattr(cls, "step", None))  # type: ignore[arg-type]


def optimizer_kind(optimizer: Any) -> OptimizerKind:
    """The update rule of ``optimizer``: its own class name, or, for a subclass of a
    ``torch.optim`` optimizer in :data:`RULED`, that base's name when it keeps the base's
    ``step`` (see the module docstring)."""
    cls = type(optimizer)
    name = cls.__name__
    if name in RULED or not isinstance(optimizer, torch.optim.Optimizer):
        return OptimizerKind(name, name)
    base = next(
        (
            b
            for b in cls.__mro__[1:]
            if b.__name__ in RULED and b.__module__.startswith("torch.optim")
        ),
        None,
    )
    if base is None:
        return OptimizerKind(name, name)
    if _raw_step(cls) is not _raw_step(base):
        return OptimizerKind(name, name, base.__name__)
    return OptimizerKind(base.__name__, f"{name}: {base.__name__}'s step")
