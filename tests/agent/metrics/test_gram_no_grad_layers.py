"""Layers the forward runs outside the autograd graph have zero per-example gradients.

A reentrant ``torch.utils.checkpoint`` none of whose inputs requires grad (a checkpointed stem
on the raw input) runs its block under ``no_grad``: torch warns "None of the inputs have
requires_grad=True", the block's weights get no gradient and training leaves them where they
are; a block in ``torch.no_grad()`` inside ``forward`` likewise. The hook path asked autograd
for the gradients of those layers' outputs and the Gram failed ("One of the differentiated
Tensors does not require grad") while the sharpness, over the same parameters, was published.
The reference is the float64 per-example loop (its ``allow_unused`` gives those layers zeros).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint as cp
from torch import Tensor, nn

from stiffmon_agent.metrics import per_example_gram
from stiffmon_agent.metrics.noise import gradient_noise
from tests.agent.metrics.reference import loop_gram, rel_err
from tests.agent.recording import close_and_read, events, offline_agent, scalar_values, train_step


class Stem(nn.Module):
    """Its first block outside the graph: reentrant-checkpointed on the input, or no_grad."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)
        self.how = how

    def block(self, x: Tensor) -> Tensor:
        return torch.tanh(self.b(torch.tanh(self.a(x))))

    def forward(self, x: Tensor) -> Tensor:
        if self.how == "reentrant":
            h = cp.checkpoint(self.block, x, use_reentrant=True)
        else:
            with torch.no_grad():
                h = self.block(x)
        out: Tensor = self.c(h)
        return out


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(12, 4, generator=g, dtype=torch.float64), torch.arange(12) % 3


@pytest.mark.parametrize("how", ["reentrant", "no_grad"])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_layer_outside_the_graph_has_zero_gradients(how: str) -> None:
    torch.manual_seed(0)
    model = Stem(how).double().eval()
    x, y = _data()
    loss_fn = nn.CrossEntropyLoss()
    ref = loop_gram(model, x, y, loss_fn)
    got = per_example_gram(model, x, y, loss_fn, chunk_size=5).total
    assert rel_err(got, ref) < 1e-12


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_agent_publishes_the_gram_of_a_reentrant_stem(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Stem("reentrant").double()
    x, y = _data()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = tmp_path / "r.stiff"
    agent = offline_agent(
        model, loss_fn, opt, rec, probe=(x, y), gram_every=1, sharpness_every="never",
        overhead_cap=None,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_step(agent, opt, loss_fn(model(x), y))
        msgs = close_and_read(agent, rec)
    assert not events(msgs, "metric-error")
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace_k = gradient_noise(loop_gram(model, x, y, loss_fn)).trace_k
    got = scalar_values(msgs, "noise/trace_k")
    assert got and got[-1] == pytest.approx(trace_k, rel=1e-10)
