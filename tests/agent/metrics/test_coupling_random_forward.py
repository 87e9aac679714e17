"""A forward that is random in eval mode is named as such, not as coupled examples.

Measurements run in eval mode, where ``nn.Dropout`` is off; ``F.dropout(x, p, training=True)``
(MC dropout) stays on, and each pass draws new masks. The Gram's check then found that the
example-alone gradients do not add up to the probe's and said the losses were "coupled across
examples (BatchNorm without running statistics, a layer or loss that mixes the batch)", which
pointed at the wrong cause; the sharpness of such a model moved by ±15 % between measurements of
nearly the same weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon import protocol as p
from stiffmon.session import read_session
from stiffmon_agent import Agent
from stiffmon_agent.metrics import per_example_gram

RANDOM = "the model's forward is random in eval mode"


class MCDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.b(F.dropout(torch.tanh(self.a(x)), 0.3, training=True))
        return out


def test_a_random_forward_is_named() -> None:
    torch.manual_seed(0)
    model = MCDropout().double().eval()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.arange(12) % 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = per_example_gram(model, x, y, nn.CrossEntropyLoss())
    assert any(RANDOM in note and "self.training" in note for note in got.notes)
    assert not any("coupled across examples" in note for note in got.notes)
    assert any(RANDOM in str(w.message) for w in caught)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_the_agent_says_so_and_leaves_the_training_rng_alone(tmp_path: Path) -> None:
    def train(rec: Path | None) -> list[float]:
        torch.manual_seed(0)
        model = MCDropout().double()
        x, y = torch.randn(12, 4, dtype=torch.float64), torch.arange(12) % 3
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        agent = None
        if rec is not None:
            agent = Agent(
                model, nn.CrossEntropyLoss(), opt, probe=(x, y), endpoint="", record=rec,
                registry=False, gram_every=1, sharpness_every="never", overhead_cap=None,
            )  # fmt: skip
        losses = []
        for _ in range(3):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
            if agent is not None:
                agent.step(loss)
        if agent is not None:
            agent.close()
        return losses

    rec = tmp_path / "mc.stiff"
    assert train(rec) == train(None)
    notes = [
        m.message
        for m in read_session(rec)[0]
        if isinstance(m, p.Event) and m.code == "gram-fallback" and RANDOM in m.message
    ]
    assert notes
