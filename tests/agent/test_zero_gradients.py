"""Probe examples with a zero gradient are said (cosine leaves their pairs out, sign counts them
as 0): once, and again only when their share moved much; the metrics stay as defined."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon import protocol as p
from stiffmon.session import read_session
from stiffmon_agent import Agent
from stiffmon_agent.zero_gradients import MAX_SAYS, ZERO_CODE, ZeroGradientSayer
from tests.agent.metrics.reference import loop_gradients

N = 16


def _hinge(out: Tensor, y: Tensor) -> Tensor:
    """relu of the target's output: flat (zero gradient) where that output is negative."""
    return F.relu(out.gather(1, y[:, None])[:, 0])


def _model() -> nn.Module:
    model = nn.Linear(2, 2).double()
    with torch.no_grad():  # both outputs are x0 (+ bias): x0 < 0 has a zero gradient
        model.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        model.bias.zero_()
    return model


def _class_mean(s: Tensor, y: Tensor, within: bool) -> float:
    """Class-balanced within / between mean of pairs i ≠ j, NaN entries left out (naive)."""
    cells = []
    for a in range(2):
        for b in range(2):
            if (a == b) != within:
                continue
            vals = [
                float(s[i, j])
                for i in range(N)
                for j in range(N)
                if i != j and y[i] == a and y[j] == b and not math.isnan(float(s[i, j]))
            ]
            if vals:
                cells.append(sum(vals) / len(vals))
    return sum(cells) / len(cells)


def test_zero_gradient_examples_are_said_once_and_again_when_their_share_moves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    model = _model()
    x = torch.stack([torch.linspace(-1, 1, N), torch.randn(N)], 1).double()
    y = torch.arange(N) % 2
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay: the same share
    rec = tmp_path / "z.stiff"
    agent = Agent(
        model, _hinge, opt, probe=(x, y), endpoint="", record=rec, registry=False,
        gram_every=1, sharpness_every="never", overhead_cap=None,
    )  # fmt: skip
    expected = []
    with caplog.at_level(logging.INFO, logger="stiffmon_agent"):
        for step in range(6):
            if step == 3:  # fewer flat examples: x0 + 0.6 < 0 only for x0 < -0.6
                with torch.no_grad():
                    model.bias.fill_(0.6)
            grads = loop_gradients(model, x, y, _hinge)  # the brute-force count
            expected.append(int((grads.abs().sum(1) == 0).sum()))
            loss = _hinge(model(x), y).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            agent.step(loss)
        agent.close()
    assert expected == [8, 8, 8, 3, 3, 3]
    msgs = read_session(rec)[0]
    said = [m for m in msgs if isinstance(m, p.Event) and m.code == ZERO_CODE]
    assert [(e.step, e.attrs["zero"], e.attrs["examples"]) for e in said] == [(0, 8, N), (3, 3, N)]
    assert said[0].level == "info"
    assert said[0].message.startswith("8 of 16 probe examples (50 %) have a zero gradient")
    assert "cosine stiffness leaves their pairs out" in said[0].message
    assert "sign stiffness counts them as sign(0) = 0" in said[0].message
    console = [r.message for r in caplog.records if "have a zero gradient" in r.message]
    assert len(console) == 2
    # the metrics are as defined: cosine leaves the zero pairs out, sign counts them as 0
    grads = loop_gradients(_model(), x, y, _hinge)
    norms = grads.norm(dim=1)
    gram = grads @ grads.T
    cos = torch.where(
        (norms[:, None] * norms[None, :]) > 0, gram / (norms[:, None] * norms[None, :]), math.nan
    )
    first = next(
        m.as_dict() for m in msgs if isinstance(m, p.Scalars) and m.step == 0 and any(
            n.startswith("stiffness/") for n in m.names)
    )  # fmt: skip
    for kind, s in (("cos", cos), ("sign", torch.sign(gram))):
        for part in ("within", "between"):
            got = first[f"stiffness/{kind}/train-train/{part}"]
            assert got == pytest.approx(_class_mean(s, y, part == "within"), abs=1e-12)


def test_no_event_where_every_gradient_is_non_zero(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = tmp_path / "n.stiff"
    agent = Agent(
        model, nn.CrossEntropyLoss(), opt, probe=(x, y), endpoint="", record=rec,
        registry=False, gram_every=1, sharpness_every="never", overhead_cap=None,
    )  # fmt: skip
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    agent.step(loss)
    agent.close()
    assert not [m for m in read_session(rec)[0] if isinstance(m, p.Event) and m.code == ZERO_CODE]


def test_the_sayer_repeats_only_for_a_moved_share_and_a_few_times() -> None:
    sayer = ZeroGradientSayer()
    assert sayer.due(0.5) and not sayer.due(0.5) and not sayer.due(0.7)
    assert sayer.due(0.2) and not sayer.due(0.0) and sayer.due(0.9)
    said = 3
    share = 0.0
    while said < MAX_SAYS:
        assert sayer.due(share)
        said, share = said + 1, 1.0 - share
    assert not sayer.due(share)  # at most MAX_SAYS in a run
