"""``Agent.set_optimizer``: a loop that replaces its optimizer object mid-run hands the agent the
new one, and from that step the columns, the stability thresholds, the preconditioned sharpness
and the measured parameters are the new optimizer's.

λ1_H is checked against a dense float64 Hessian of the mean cross-entropy over the parameters the
optimizer of each step holds (the whole network under Adam, the head alone after the swap).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stiffmon import protocol as p
from stiffmon.session.reader import read_session
from stiffmon_agent import Agent
from tests.agent.metrics.reference import dense_hessian_of


def _lambda1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, last: int = 0) -> float:
    """Top eigenvalue of the dense Hessian of the mean cross-entropy over the trainable
    parameters (over the ``last`` entries alone where given: those parameters, the others held
    fixed)."""
    h = dense_hessian_of(model, x, lambda out: nn.functional.cross_entropy(out, y))
    return float(torch.linalg.eigvalsh(h[-last:, -last:] if last else h)[-1])


def _scalar(msgs: list[p.Message], name: str) -> dict[int, float]:
    out = {}
    for m in msgs:
        if isinstance(m, p.Scalars) and name in m.names:
            out[m.step] = float(m.values[m.names.index(name)])
    return out


def test_warm_up_with_adam_then_sgd_on_the_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dt = torch.float64
    x, y = torch.randn(48, 6, dtype=dt), torch.randint(0, 4, (48,))
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(dt)
    opt: torch.optim.Optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    rec = tmp_path / "swap.stiff"
    agent = Agent(
        net, nn.CrossEntropyLoss(), opt, probe=(x[:16], y[:16]), record=rec, endpoint="",
        registry=False, gram_every="never", sharpness_every=1, density_every="never",
        overhead_cap=None, hessian_tol=1e-8, max_hvps=200,
    )  # fmt: skip
    head = net[2].weight.numel() + net[2].bias.numel()  # the last parameters
    ref: dict[int, float] = {}
    for s in range(10):
        if s == 5:  # the backbone is frozen out of the new optimizer: SGD on the head alone
            opt = torch.optim.SGD(net[2].parameters(), lr=0.05, momentum=0.9)
            agent.set_optimizer(opt)
        i = torch.arange(16) + 16 + 2 * s % 16
        loss = nn.functional.cross_entropy(net(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref[s] = _lambda1(net, x[:16], y[:16], 0 if s < 5 else head)
        agent.step(loss)
    agent.close()
    msgs = read_session(rec)[0]
    events = [m for m in msgs if isinstance(m, p.Event)]
    codes = [e.code for e in events]
    assert "optimizer-step-skipped" not in codes and "metric-error" not in codes, codes
    (swap,) = [e for e in events if e.code == "optimizer-replaced"]
    assert swap.step == 5 and "SGD (lr 0.05, momentum 0.9" in swap.message
    assert (swap.attrs["optimizer"], swap.attrs["previous"]) == ("SGD", "Adam")
    assert swap.attrs["param_count"] == 8 * 4 + 4
    (skipped,) = [e for e in events if e.code == "params-not-optimized"]
    assert skipped.step == 5
    cols = [m for m in msgs if isinstance(m, p.Columns)]
    lrs = np.concatenate([m.column("lr/0") for m in cols]).tolist()
    assert lrs == [1e-3] * 5 + [0.05] * 5
    lam, thr = _scalar(msgs, "sharpness/lambda1_h"), _scalar(msgs, "sharpness/threshold")
    precond = _scalar(msgs, "sharpness/lambda1_precond")
    assert sorted(lam) == list(range(10))
    for s in range(10):
        assert lam[s] == pytest.approx(ref[s], rel=1e-6), s
    assert all(thr[s] == pytest.approx(2 * 1.9 / 0.05) for s in range(5, 10))  # (2 + 2β)/η
    assert set(precond) == set(range(5))  # SGD: no preconditioned sharpness


def test_the_same_optimizer_again_or_a_wrong_object(tmp_path: Path) -> None:
    net = nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    rec = tmp_path / "same.stiff"
    agent = Agent(net, nn.CrossEntropyLoss(), opt, record=rec, endpoint="", registry=False)
    agent.set_optimizer(opt)
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        agent.set_optimizer(net)  # type: ignore[arg-type]
    agent.step(1.0)
    agent.close()
    assert not [m for m in read_session(rec)[0] if getattr(m, "code", "") == "optimizer-replaced"]


def test_to_none_and_back_reads_no_columns_then_the_new_ones(tmp_path: Path) -> None:
    net = nn.Linear(3, 2)
    first = torch.optim.SGD(net.parameters(), lr=0.1)
    rec = tmp_path / "none.stiff"
    agent = Agent(net, nn.CrossEntropyLoss(), first, record=rec, endpoint="", registry=False)
    x, y = torch.randn(8, 3), torch.arange(8) % 2
    for s, opt in enumerate([first, None, torch.optim.SGD(net.parameters(), lr=0.2)]):
        agent.set_optimizer(opt)
        loss = nn.functional.cross_entropy(net(x), y)
        net.zero_grad()
        loss.backward()
        if opt is not None:
            opt.step()
        agent.step(loss)
        assert math.isfinite(loss.item()), s
    agent.close()
    cols = [m for m in read_session(rec)[0] if isinstance(m, p.Columns)]
    lr = {
        int(st): v
        for m in cols
        if "lr/0" in m.names
        for st, v in zip(m.steps, m.column("lr/0"), strict=True)
    }
    assert lr == {0: 0.1, 2: 0.2}


def test_agent_step_before_optimizer_step_is_still_known_after_the_swap(tmp_path: Path) -> None:
    """A loop calling ``agent.step()`` before ``optimizer.step()`` is judged once (fourth step):
    the new optimizer's rows, too, read the lr the coming step uses."""
    net = nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    rec = tmp_path / "order.stiff"
    agent = Agent(net, nn.CrossEntropyLoss(), opt, record=rec, endpoint="", registry=False)
    x, y = torch.randn(8, 3), torch.arange(8) % 2
    for s in range(12):
        if s == 6:
            opt = torch.optim.SGD(net.parameters(), lr=0.0)
            agent.set_optimizer(opt)
        opt.param_groups[0]["lr"] = 0.01 * (s + 1)  # this step's lr, set by hand
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        agent.step(loss)
        opt.step()
    agent.close()
    cols = [m for m in read_session(rec)[0] if isinstance(m, p.Columns)]
    lrs = np.concatenate([m.column("lr/0") for m in cols]).tolist()
    assert lrs[4:] == pytest.approx([0.01 * (s + 1) for s in range(4, 12)])
