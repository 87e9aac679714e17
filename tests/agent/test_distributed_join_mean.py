"""A mean-reduced loss under ``Join([model, agent])`` while a rank has joined.

DDP divides the active ranks' summed gradients by the initial W, so with rank 1 joined at step 2
a step descends F = (1/W) L_0, half rank 0's mean loss: λ1_H is that of W_active / W = 1/2 × the
per-example mean (it was reported for the mean, 2× too high). The probe is rank 0's step-2
batch, so the reference is exact: the dense float64 Hessian of F at the weights after step 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from stiffmon.session import read_session
from tests.agent.metrics.reference import dense_hessian_of
from tests.agent.test_distributed_join import _SCRIPT
from tests.agent.torchrun import run_ranks


def test_a_mean_loss_while_a_rank_has_joined(tmp_path: Path) -> None:
    script, rec, weights = tmp_path / "join.py", tmp_path / "j.stiff", tmp_path / "w.pt"
    mean = _SCRIPT.replace('nn.CrossEntropyLoss(reduction="sum")', "nn.CrossEntropyLoss()")
    assert mean != _SCRIPT
    script.write_text(mean)
    run_ranks(script, str(rec), str(weights), timeout=60)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.arange(30) % 3
    net.load_state_dict(torch.load(weights))
    msgs = read_session(rec)[0]
    (spectrum,) = [m for m in msgs if type(m).__name__ == "Spectrum" and m.name == "hessian"]
    assert spectrum.step == 2
    assert spectrum.attrs["objective"].startswith("mean × 1/2")
    h = dense_hessian_of(net, x[20:25], lambda o: nn.functional.cross_entropy(o, y[20:25]) / 2)
    assert float(spectrum.values[0]) == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), 1e-6)
