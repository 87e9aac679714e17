"""A batch-norm layer without running statistics cannot take an example alone.

``BatchNorm1d(track_running_stats=False)`` normalises with the batch's own statistics in eval
mode too; on (N, C) features an example alone has one value per channel and torch raises
"Expected more than 1 value per channel when training". The Gram's per-example gradients need
each example alone, so it fails; its ``metric-error`` used to be torch's message only. It now
names the layer and the way out, while training and the sharpness (of the probe's coupled
objective, checked against a float64 dense Hessian) go on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.agent.metrics.reference import dense_hessian_of
from tests.agent.recording import (
    EXACT,
    close_and_read,
    events,
    offline_agent,
    scalar_values,
    train_step,
)


def test_the_gram_error_names_the_layer_and_the_way_out(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Tanh(), nn.Linear(8, 3)
    ).double()
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.arange(12) % 3
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay where the refs are
    rec = tmp_path / "bn.stiff"
    agent = offline_agent(model, loss_fn, opt, rec, probe=(x, y), **EXACT)
    for _ in range(2):  # training goes on past the failed measurement
        train_step(agent, opt, loss_fn(model(x), y))
    msgs = close_and_read(agent, rec)
    errors = [e.message for e in events(msgs, "metric-error")]
    assert len(errors) == 1 and errors[0].startswith("gram failed: ")
    assert "batch normalisation without running statistics ('1' (BatchNorm1d))" in errors[0]
    assert 'pass gram_every="never"' in errors[0]
    lam = scalar_values(msgs, "sharpness/lambda1_h")
    model.eval()
    hess = dense_hessian_of(model, x, lambda out: loss_fn(out, y))
    assert len(lam) == 2
    assert float(lam[-1]) == pytest.approx(float(torch.linalg.eigvalsh(hess)[-1]), rel=1e-6)
