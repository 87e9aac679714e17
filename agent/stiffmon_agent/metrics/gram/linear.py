r"""``nn.Linear``: ∇W_i = Σ_t b_i[t] a_i[t]ᵀ over positions t; ∇b_i = Σ_t b_i[t].

Hugging Face's ``Conv1D`` (GPT-2, GPT) is a linear layer whose weight is stored transposed,
(d_in, d_out): ∇W_i = Σ_t a_i[t] b_i[t]ᵀ, the transpose of the same factors, which gives the same
inner products ⟨∇W_i, ∇W_j⟩ = Σ_{t,s} (a_i[t]·a_j[s]) (b_i[t]·b_j[s]).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from stiffmon_agent.metrics.gram.rules import Factors, batch_first_call, register


def linear_factors(a: Tensor, b: Tensor, n: int) -> Factors:
    """Weight factors (a, b) of shape (n, g, T, d) and the bias's dense per-example gradient."""
    return {"weight": ("linear", a, b), "bias": ("dense", b.sum(dim=2).reshape(n, -1), None)}


@register(nn.Linear)
class LinearRule:
    """Any leading shape (N, …, d_in): the middle dimensions are positions t."""

    def native(self, mod: nn.Module) -> bool:
        return True

    def valid_call(self, mod: nn.Module, x: Any, out: Any, n: int) -> bool:
        assert isinstance(mod, nn.Linear)
        return batch_first_call(x, out, n) and x.shape[-1] == mod.in_features

    def factors(self, mod: nn.Module, x: Tensor, gy: Tensor, n: int) -> Factors:
        assert isinstance(mod, nn.Linear)
        a = x.reshape(n, 1, -1, mod.in_features)
        b = gy.reshape(n, 1, -1, mod.out_features)
        return linear_factors(a, b, n)


@register("transformers.pytorch_utils.Conv1D")
class TransposedLinearRule:
    """``y = x W + b`` with W of shape (d_in, d_out), any leading shape (N, …, d_in)."""

    def native(self, mod: nn.Module) -> bool:
        w = getattr(mod, "weight", None)
        return (
            isinstance(w, Tensor)
            and w.dim() == 2
            and isinstance(getattr(mod, "bias", None), Tensor)
        )

    def valid_call(self, mod: nn.Module, x: Any, out: Any, n: int) -> bool:
        d_in, d_out = mod.weight.shape
        return batch_first_call(x, out, n) and x.shape[-1] == d_in and out.shape[-1] == d_out

    def factors(self, mod: nn.Module, x: Tensor, gy: Tensor, n: int) -> Factors:
        d_in, d_out = mod.weight.shape
        a = x.reshape(n, 1, -1, d_in)
        b = gy.reshape(n, 1, -1, d_out)
        return linear_factors(a, b, n)
