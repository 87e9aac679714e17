"""A subclass of a layer with a native Gram rule that overrides ``forward`` takes the fallbacks.

torchvision's and timm's ConvNeXt normalise with ``LayerNorm2d(nn.LayerNorm)``, whose forward
applies the LayerNorm to a permuted (N, H, W, C) view of its (N, C, H, W) input; the LayerNorm
rule read the module's input as it came and raised, which turned the Gram off for the run.
timm's ``StdConv2d(nn.Conv2d)`` standardises its weight in its forward, which the convolution
rule does not know. Each such module's parameters must take ``vmap`` and give the float64
loop's Gram matrix G[i, j] = g_i · g_j.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon_agent.metrics import per_example_gram
from tests.agent.metrics.reference import loop_gram, rel_err
from tests.agent.recording import (
    EVERY_STEP,
    close_and_read,
    last_scalar,
    metric_errors,
    offline_agent,
    train_step,
)

CE = nn.CrossEntropyLoss()


class LayerNorm2d(nn.LayerNorm):
    """torchvision.models.convnext.LayerNorm2d: a LayerNorm over the channels of (N, C, H, W)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class StdConv2d(nn.Conv2d):
    """timm's weight-standardised convolution: W ← (W − mean) / std per output channel."""

    def forward(self, x: Tensor) -> Tensor:
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, eps=1e-6
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = StdConv2d(3, 6, 2, stride=2)
        self.norm = LayerNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.dw(self.norm(self.stem(x))))
        return self.head(h.mean(dim=(2, 3)))


def _data() -> tuple[Tensor, Tensor]:
    torch.manual_seed(0)
    return torch.randn(8, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))


def test_subclasses_with_their_own_forward_take_vmap() -> None:
    x, y = _data()
    torch.manual_seed(1)
    model = Net().double().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_()
    got = per_example_gram(model, x, y, CE)
    assert got.methods["norm"] == "vmap" and got.methods["stem"] == "vmap", got.methods
    assert got.methods["dw"] in ("ghost", "materialise"), got.methods  # the plain Conv2d's rule
    assert rel_err(got.total, loop_gram(model, x, y, CE)) < 1e-10


def test_an_agent_measures_a_convnext_norm(tmp_path: Path) -> None:
    """Tr K of the agent's record equals the float64 loop's (the Gram was off before)."""
    x, y = _data()
    torch.manual_seed(1)
    model = Net().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = tmp_path / "r.stiff"
    agent = offline_agent(model, CE, opt, rec, probe=(x, y), **EVERY_STEP)
    out = model(x)
    train_step(agent, opt, CE(out, y), out, y)
    msgs = close_and_read(agent, rec)
    assert "gram" not in metric_errors(msgs)
    g = loop_gram(model, x, y, CE)
    c = g - g.mean(0, keepdim=True) - g.mean(1, keepdim=True) + g.mean()
    trace_k = float(c.trace() / len(y))
    assert abs(last_scalar(msgs, "noise/trace_k") - trace_k) < 1e-9 * trace_k


def test_sync_batch_norm_keeps_the_batch_norm_rule() -> None:
    """``SyncBatchNorm`` overrides ``forward`` but, in eval mode (every measurement), is
    ``_BatchNorm``'s: it keeps the native rule and gives the loop's Gram matrix."""
    x, y = _data()
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3)
    ).double()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
    model.eval()
    got = per_example_gram(model, x, y, CE)
    assert got.methods["1"] in ("ghost", "materialise"), got.methods
    assert rel_err(got.total, loop_gram(model, x, y, CE)) < 1e-10
