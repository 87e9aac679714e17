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

from stiffmon import protocol as p
from stiffmon.session import read_session
from stiffmon_agent import Agent
from stiffmon_agent.metrics import per_example_gram
from stiffmon_agent.metrics.noise import gradient_noise
from tests.agent.metrics.reference import loop_gram, rel_err


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
    agent = Agent(
        model, loss_fn, opt, probe=(x, y), endpoint="", record=rec, registry=False,
        gram_every=1, sharpness_every="never", overhead_cap=None,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        agent.step(loss)
        agent.close()
    msgs = read_session(rec)[0]
    assert not [m for m in msgs if isinstance(m, p.Event) and m.code == "metric-error"]
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace_k = gradient_noise(loop_gram(model, x, y, loss_fn)).trace_k
    got = [m.as_dict()["noise/trace_k"] for m in msgs if isinstance(m, p.Scalars)
           and "noise/trace_k" in m.names]  # fmt: skip
    assert got and float(got[-1]) == pytest.approx(trace_k, rel=1e-10)
