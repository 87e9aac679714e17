r"""``nn.Embedding``: ∇E_i = Σ_t e_{tok_i[t]} b_i[t]ᵀ, kept as tokens and output gradients (the
Gram is taken over shared tokens, :func:`~.contract.embedding_gram`). ``padding_idx`` rows get no
gradient. ``max_norm`` (renormalises rows in place during the forward) and
``scale_grad_by_freq`` (couples the examples of a batch) are left to the loop fallback."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from stiffmon_agent.metrics.gram.rules import Factors, batch_first_call, register


@register(nn.Embedding)
class EmbeddingRule:
    def native(self, mod: nn.Module) -> bool:
        assert isinstance(mod, nn.Embedding)
        return mod.max_norm is None and not mod.scale_grad_by_freq

    def valid_call(self, mod: nn.Module, x: Any, out: Any, n: int) -> bool:
        return batch_first_call(x, out, n) and not x.is_floating_point()

    def factors(self, mod: nn.Module, x: Tensor, gy: Tensor, n: int) -> Factors:
        assert isinstance(mod, nn.Embedding)
        tokens = x.reshape(n, -1)
        b = gy.reshape(n, tokens.shape[1], -1)
        if mod.padding_idx is not None:
            b = b * (tokens != mod.padding_idx).unsqueeze(-1).to(b.dtype)
        return {"weight": ("embedding", tokens, b)}
