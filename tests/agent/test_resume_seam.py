"""A run that crashed and was resumed from its checkpoint with ``Agent(start_step=N)`` into the
same ``record=`` file, read back as ``stiffmon summary`` reads it.

The dead run recorded steps 0–22 (checkpoint before step 15), the resumed one 15–39: steps 15–22
twice. Each run keeps its own values (checked against the loop's own float64 numbers and a dense
Hessian), and the resumed run's break-even is the dead run's early-phase peak (before: judged on
its measurements from step 15 alone, it had none).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from stiffmon.export import load
from tests.agent.metrics.reference import dense_hessian_of
from tests.agent.recording import offline_agent, train_step


def _loop(rec: Path, net: nn.Module, opt: torch.optim.Optimizer, start: int, stop: int) -> dict:
    x, y = _data()
    agent = offline_agent(
        net, nn.CrossEntropyLoss(), opt, rec, probe=(x[:32], y[:32]), run="exp", start_step=start,
        gram_every="never", sharpness_every=1, density_every="never", overhead_cap=None,
        hessian_tol=1e-10, max_hvps=200,
    )  # fmt: skip
    seen: dict[int, tuple[float, float]] = {}
    ckpt = None
    for k in range(start, stop):
        if k == 15:
            ckpt = copy.deepcopy((net.state_dict(), opt.state_dict()))
        idx = torch.randint(32, 200, (16,), generator=torch.Generator().manual_seed(1000 + k))
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        train_step(agent, opt, loss)
        net.eval()
        h = dense_hessian_of(net, x[:32], lambda o: nn.functional.cross_entropy(o, y[:32]))
        net.train()
        seen[k] = (loss.item(), float(torch.linalg.eigvalsh(h)[-1]))
    agent.close()
    return {"seen": seen, "ckpt": ckpt, "run": agent.run_id}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(200, 6, dtype=torch.float64), torch.randint(0, 4, (200,))


def _model() -> tuple[nn.Module, torch.optim.Optimizer]:
    _data()  # the same draws as the script this test was found with: its λ1 peaks at step 9
    was = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    finally:
        torch.set_default_dtype(was)
    return net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.slow
def test_crash_and_resume_into_the_same_file(tmp_path: Path) -> None:
    rec = tmp_path / "run.stiff"
    net, opt = _model()
    dead = _loop(rec, net, opt, 0, 23)  # crashed after step 22
    net, opt = _model()
    net.load_state_dict(dead["ckpt"][0])
    opt.load_state_dict(dead["ckpt"][1])
    resumed = _loop(rec, net, opt, 15, 30)
    store = load([rec])
    a, b = store.runs[dead["run"]], store.runs[resumed["run"]]
    for rd, want in ((a, dead["seen"]), (b, resumed["seen"])):
        loss, lam = rd.scalars["loss"], rd.scalars["sharpness/lambda1_h"]
        assert loss.steps.tolist() == sorted(want) == lam.steps.tolist()
        for s, v in zip(loss.steps.tolist(), loss.values.tolist(), strict=True):
            assert abs(v - want[s][0]) <= 1e-12 * abs(want[s][0])
        for s, v in zip(lam.steps.tolist(), lam.values.tolist(), strict=True):
            assert abs(v - want[s][1]) <= 1e-8 * abs(want[s][1])
    be_a, be_b = a.break_even(), b.break_even()
    assert be_a.step is not None and be_a.step < 15 and be_a.confirmed
    assert be_b == be_a
    assert b.continues is a
    assert abs(be_b.value - dead["seen"][be_a.step][1]) <= 1e-8 * be_b.value
    (note,) = [e for e in b.events if e.code == "resumed"]
    assert "steps 15–22 were recorded by both" in note.message
