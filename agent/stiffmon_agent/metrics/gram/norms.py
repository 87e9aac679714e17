r"""``nn.LayerNorm`` and BatchNorm with running statistics (eval mode): small per-example gradients
materialised directly, ∇γ_i = Σ_t x̂_i[t] ∘ b_i[t], ∇β_i = Σ_t b_i[t], with x̂ the normalised
input. BatchNorm without running statistics couples the examples of a batch and is left to the
fallbacks (whose per-example batches of one reproduce what a single example sees)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from stiffmon_agent.metrics.gram.rules import Factors, batch_first_call, register


def _dense(xhat: Tensor, b: Tensor) -> Factors:
    return {
        "weight": ("dense", (xhat * b).sum(dim=1), None),
        "bias": ("dense", b.sum(dim=1), None),
    }


@register(nn.LayerNorm)
class LayerNormRule:
    def native(self, mod: nn.Module) -> bool:
        return True

    def valid_call(self, mod: nn.Module, x: Any, out: Any, n: int) -> bool:
        return batch_first_call(x, out, n)

    def factors(self, mod: nn.Module, x: Tensor, gy: Tensor, n: int) -> Factors:
        assert isinstance(mod, nn.LayerNorm)
        d = math.prod(mod.normalized_shape)
        xhat = F.layer_norm(x, mod.normalized_shape, None, None, mod.eps).reshape(n, -1, d)
        return _dense(xhat, gy.reshape(n, -1, d))


@register(_BatchNorm, nn.SyncBatchNorm)  # its own forward is _BatchNorm's in eval mode
class BatchNormRule:
    def native(self, mod: nn.Module) -> bool:
        assert isinstance(mod, _BatchNorm)
        return mod.track_running_stats and mod.running_mean is not None

    def valid_call(self, mod: nn.Module, x: Any, out: Any, n: int) -> bool:
        assert isinstance(mod, _BatchNorm)
        return batch_first_call(x, out, n) and x.dim() >= 2 and x.shape[1] == mod.num_features

    def factors(self, mod: nn.Module, x: Tensor, gy: Tensor, n: int) -> Factors:
        assert isinstance(mod, _BatchNorm) and mod.running_mean is not None
        assert mod.running_var is not None
        c = x.shape[1]
        shape = (1, c) + (1,) * (x.dim() - 2)
        xhat = (x - mod.running_mean.view(shape)) / torch.sqrt(
            mod.running_var.view(shape) + mod.eps
        )
        xhat = xhat.reshape(n, c, -1).transpose(1, 2)
        return _dense(xhat, gy.reshape(n, c, -1).transpose(1, 2))
