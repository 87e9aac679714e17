r"""Per-layer Gram rules, registered by ``nn.Module`` type (as Opacus keeps ``grad_sample/``).

A rule turns one call of a layer — its input x and the gradient gy of the summed per-example
losses with respect to its output, both with the examples along dim 0 — into per-example
*factors* of the layer's parameter gradients:

* ``("linear", a, b)``: ∇W_i = Σ_t b_i[t] a_i[t]ᵀ, a (n, g, T, d_in), b (n, g, T, d_out) (groups g
  of a grouped convolution, positions t of a sequence or of an unfolded convolution);
* ``("embedding", tokens, b)``: ∇E_i = Σ_t e_{tok_i[t]} b_i[t]ᵀ, tokens (n, T), b (n, T, d);
* ``("dense", grads, None)``: the per-example gradients themselves, (n, P) — for small parameters.

One module per layer family (:mod:`.linear`, :mod:`.conv`, :mod:`.embedding`, :mod:`.norms`,
:mod:`.attention`) registers its rule with :func:`register`; :func:`rule_for` finds the rule of a
module through its type's MRO. Modules without a rule (or whose rule declines them) take the
``vmap`` or loop fallback.

A rule whose layer does its work through functional calls on its parameters
(``nn.MultiheadAttention``) is a :class:`CaptureRule`: it owns parameters of its sub-modules too
(:meth:`CaptureRule.parameters`), records its own calls during the hook pass
(:meth:`CaptureRule.install`: each call gives a context of detached inputs and the graph nodes
whose gradients it needs) and turns a call's context and node gradients into factors
(:meth:`CaptureRule.call_factors`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from torch import Tensor, nn

Factors = dict[str, tuple[str, Tensor, Tensor | None]]


class LayerRule(Protocol):
    """How one layer family gives its per-example gradient factors."""

    def native(self, mod: nn.Module) -> bool:
        """Whether this module (with its configuration) can take the hook path at all."""
        ...

    def valid_call(self, mod: nn.Module, x: Any, out: Any, n: int) -> bool:
        """Whether a call with input ``x`` and output ``out`` has the n examples along dim 0."""
        ...

    def factors(self, mod: nn.Module, x: Tensor, gy: Tensor, n: int) -> Factors:
        """``{parameter name: (kind, a, b)}`` of one call (see the module docstring)."""
        ...


Record = Callable[[Any, dict[str, Tensor]], None]
"""``record(context, nodes)``: one call of a capturing layer (see :class:`CaptureRule`)."""


class Handle(Protocol):
    def remove(self) -> None: ...


class CaptureRule(Protocol):
    """A layer family that records its own calls (instead of a forward hook on the module)."""

    def native(self, mod: nn.Module) -> bool: ...

    def parameters(self, mod: nn.Module) -> dict[str, nn.Parameter]:
        """Parameters it gives factors for, by name relative to ``mod`` (``"out_proj.weight"``)."""
        ...

    def install(self, mod: nn.Module, n: int, record: Record, fail: Callable[[], None]) -> Handle:
        """Record every call of ``mod`` until the handle is removed; ``fail()`` for a call it
        cannot take (the call then runs unchanged and the layer takes the fallbacks)."""
        ...

    def call_factors(
        self, mod: nn.Module, context: Any, grads: dict[str, Tensor], n: int
    ) -> Factors:
        """Factors of one recorded call from its context and the gradients of its nodes."""
        ...


RULES: dict[type[nn.Module], LayerRule | CaptureRule] = {}


NAMED_RULES: dict[str, LayerRule | CaptureRule] = {}
"""Rules for types of optional packages, by ``module.qualname`` (nothing imported for them)."""


def register(*types: type[nn.Module] | str) -> Callable[[type], type]:
    """Class decorator: register an instance of the rule class for these module types (or
    ``"package.module.Class"`` names of types in packages the agent does not import)."""

    def deco(cls: type) -> type:
        rule = cls()
        for t in types:
            if isinstance(t, str):
                NAMED_RULES[t] = rule
            else:
                RULES[t] = rule
        return cls

    return deco


def rule_for(mod: nn.Module) -> LayerRule | CaptureRule | None:
    """The registered rule for ``mod``'s type (nearest in the MRO), if it accepts the module.

    A subclass that overrides the registered type's ``forward`` computes something the rule does
    not know (``LayerNorm2d(nn.LayerNorm)`` of torchvision's and timm's ConvNeXt normalises a
    permuted (N, H, W, C) view of its (N, C, H, W) input; timm's ``StdConv2d`` standardises its
    weight): it takes no rule, so its parameters take the ``vmap`` or loop fallback, which
    differentiate the forward it has.
    """
    for t in type(mod).__mro__:
        rule = RULES.get(t) or NAMED_RULES.get(f"{t.__module__}.{t.__qualname__}")
        if rule is not None:
            if getattr(type(mod), "forward", None) is not getattr(t, "forward", None):
                return None
            return rule if rule.native(mod) else None
    return None


def batch_first_call(x: Any, out: Any, n: int) -> bool:
    """Tensors in and out, both with n examples along dim 0."""
    if not isinstance(x, Tensor) or not isinstance(out, Tensor) or x.dim() == 0:
        return False
    return x.shape[0] == n and out.dim() > 0 and out.shape[0] == n
