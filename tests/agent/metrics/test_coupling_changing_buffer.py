"""A buffer that every forward updates, eval mode or not, is named as the cause.

A running statistic updated whatever ``self.training`` is changes the function between the
Gram's per-example passes, so the example-alone gradients do not add up to the probe's. The
check used to blame a random forward (dropout, noise), which the model does not have.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from stiffmon_agent.metrics import per_example_gram


class RunningCentre(nn.Module):
    """Centres its hidden layer by a running mean it updates in every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.register_buffer("centre", torch.zeros(8))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        with torch.no_grad():
            self.centre.mul_(0.5).add_(0.5 * h.mean(0))
        out: Tensor = self.b(h - self.centre)
        return out


def test_a_buffer_changing_in_eval_mode_is_named() -> None:
    torch.manual_seed(0)
    model = RunningCentre().double().eval()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.arange(12) % 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = per_example_gram(model, x, y, nn.CrossEntropyLoss())
    assert any("buffer centre change" in note for note in got.notes), got.notes
    assert not any("random in eval mode" in note for note in got.notes)
