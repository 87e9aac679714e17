"""Which torch optimizer's update rule a given optimizer follows, for its stability threshold.

The thresholds (:mod:`~stiffmon_agent.metrics.thresholds`) are derived from the update of a
torch optimizer (``torch.optim.SGD``, ``Adam``, …), so they hold for any optimizer whose
``step()`` *is* that update. A subclass that does not override ``step`` (``class
MySGD(torch.optim.SGD): pass``, or one adding a method or a property) steps exactly as its
torch base, and gets its rule. A subclass that overrides ``step`` may do anything (clip, centre
or rescale the gradient, take two steps, …): its bound cannot be known, and assuming the base's
would be a silently wrong number, so it gets none, and the reason says why and how it could get
one (keep the base's ``step``).

An optimizer whose state holds entries its own ``step`` never writes (``z`` of a schedule-free
wrapper, ``lookahead_slow_buff`` of timm's Lookahead: wrappers that keep their buffers in the
state of the optimizer they wrap) is being stepped through by something else, which moves the
weights its own way: handed to the agent instead of the wrapper, it gets no bound either, and
the reason names the entries (:data:`STATE_KEYS`).

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


STATE_KEYS: dict[str, frozenset[str]] = {
    "SGD": frozenset({"momentum_buffer"}),
    "ASGD": frozenset({"step", "eta", "mu", "ax"}),
    "Adam": frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    "Adamax": frozenset({"step", "exp_avg", "exp_inf"}),
    "NAdam": frozenset({"step", "exp_avg", "exp_avg_sq", "mu_product"}),
    "RAdam": frozenset({"step", "exp_avg", "exp_avg_sq"}),
    "SparseAdam": frozenset({"step", "exp_avg", "exp_avg_sq"}),
    "RMSprop": frozenset({"step", "square_avg", "momentum_buffer", "grad_avg"}),
    "Adagrad": frozenset({"step", "sum"}),
    "Adadelta": frozenset({"step", "square_avg", "acc_delta"}),
}
STATE_KEYS["AdamW"] = STATE_KEYS["Adam"]
"""The per-parameter state entries each ruled ``torch.optim`` optimizer's ``step`` writes;
any other entry was put there by something that steps through it (a wrapper)."""


def foreign_state(optimizer: Any, rule: str) -> list[str]:
    """The state entries of ``optimizer`` that ``rule``'s step never writes (sorted; [] where
    the rule's entries are not listed or none are foreign). Reads the keys of every
    parameter's state dict: no tensor is touched."""
    known = STATE_KEYS.get(rule)
    state = getattr(optimizer, "state", None)
    if known is None or not isinstance(state, dict):
        return []
    keys: set[str] = set()
    for st in list(state.values()):
        if isinstance(st, dict):
            keys.update(k for k in st if isinstance(k, str))
    return sorted(keys - known)


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
        overridden: The ``torch.optim`` base whose ``step`` a subclass overrides, or whose
            state a wrapper writes into (no rule applies), else "".
        foreign: The state entries the rule's ``step`` never writes (a wrapper's), if any.
    """

    rule: str
    label: str
    overridden: str = ""
    foreign: tuple[str, ...] = ()

    @property
    def why_none(self) -> str:
        """Why a subclass that overrides ``step`` gets no threshold ("" if it does not)."""
        if not self.overridden:
            return ""
        if self.foreign:
            keys = ", ".join(repr(k) for k in self.foreign)
            return (
                f"{self.label}'s state holds {keys}, which torch.optim.{self.overridden}.step "
                "never writes: a wrapper (schedule-free, Lookahead, …) steps through it and "
                f"moves the weights its own way, so {self.overridden}'s bound is not assumed "
                "(give the agent the wrapper)"
            )
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
    kind = _kind_by_class(optimizer)
    if kind.overridden or not isinstance(optimizer, torch.optim.Optimizer):
        return kind
    foreign = foreign_state(optimizer, kind.rule)
    if foreign:
        return OptimizerKind(kind.rule, kind.label, kind.rule, tuple(foreign))
    return kind


def _kind_by_class(optimizer: Any) -> OptimizerKind:
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
