r"""``nn.Conv1d`` / ``nn.Conv2d`` as a Linear over unfolded patches (any padding mode, stride,
dilation, groups): a_i[t] is the patch at output position t, b_i[t] the output gradient there."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon_agent.metrics.gram.linear import linear_factors
from stiffmon_agent.metrics.gram.rules import Factors, batch_first_call, register


@register(nn.Conv1d, nn.Conv2d)
class ConvRule:
    def native(self, mod: nn.Module) -> bool:
        return True

    def valid_call(self, mod: nn.Module, x: Any, out: Any, n: int) -> bool:
        return batch_first_call(x, out, n)

    def factors(self, mod: nn.Module, x: Tensor, gy: Tensor, n: int) -> Factors:
        assert isinstance(mod, nn.Conv1d | nn.Conv2d)
        pad = tuple(mod._reversed_padding_repeated_twice)  # last dims first, as F.pad wants
        if any(pad):
            mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
            x = F.pad(x, pad, mode=mode)
        if isinstance(mod, nn.Conv1d):  # as a Conv2d of height 1
            x, gy = x.unsqueeze(2), gy.unsqueeze(2)
            kernel, stride = (1, mod.kernel_size[0]), (1, mod.stride[0])
            dilation = (1, mod.dilation[0])
        else:
            kernel, stride, dilation = mod.kernel_size, mod.stride, mod.dilation
        cols = unfold(x, kernel, dilation, stride)  # (n, C·k, L)
        g = mod.groups
        a = cols.reshape(n, g, -1, cols.shape[-1]).transpose(2, 3)  # (n, g, L, C_in/g·k)
        b = gy.reshape(n, g, mod.out_channels // g, -1).transpose(2, 3)  # (n, g, L, C_out/g)
        return linear_factors(a, b, n)


def unfold(
    x: Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...], stride: tuple[int, ...]
) -> Tensor:
    """``F.unfold`` (patches as (n, C·kh·kw, L), channel-major) from a strided view and one copy.

    ``F.unfold`` on CUDA launches a kernel per example (512 for N = 256 on the reference CNN,
    58 % of the Gram's GPU time) and is 4–10× slower on the CPU than this view.
    """
    (kh, kw), (dh, dw), (sh, sw) = kernel, dilation, stride
    p = x.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]
    n, c, ho, wo = p.shape[:4]  # p: (n, C, Ho, Wo, kh, kw)
    return p.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo)
