"""A user's forward hook that changes a layer's output stays on the Gram's hook path.

The Gram's hook path reads a layer's input a and the gradient b of its output, and needs the
output the layer itself computed (a Linear's out = W a + c). A forward hook of the user's that
returns a new output (a scale, a shift, a mask) runs before the agent's hook unless the agent's
hook comes first; the agent's hook then sees the changed output, its b is the gradient of that
one, and the fast path disagrees with single-example backward passes (a ``gram-fallback``
warning blaming the model, and the slow exact path for the whole run).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.agent.metrics.reference import loop_gradients
from tests.agent.recording import (
    EXACT,
    close_and_read,
    events,
    last_scalar,
    offline_agent,
    train_step,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.parametrize("where", [0, 2])
def test_an_output_changing_forward_hook_keeps_the_fast_path(tmp_path: Path, where: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(24, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    model[where].register_forward_hook(lambda mod, args, out: 2.0 * out + 0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    rec = tmp_path / "r.stiff"
    agent = offline_agent(model, nn.CrossEntropyLoss(), opt, rec, probe=(x, y), **EXACT)
    train_step(agent, opt, nn.functional.cross_entropy(model(x), y))
    msgs = close_and_read(agent, rec)
    assert events(msgs, "gram-fallback") == []
    g = loop_gradients(model, x, y, nn.functional.cross_entropy)  # one backward per example
    trace_k = float((g - g.mean(0)).square().sum(1).mean())
    assert last_scalar(msgs, "noise/trace_k") == pytest.approx(trace_k, rel=1e-9)
