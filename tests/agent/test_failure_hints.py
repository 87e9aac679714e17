"""A metric disabled by reentrant ``torch.utils.checkpoint`` says so, and how to fix it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.utils.checkpoint as cp
from torch import nn

from stiffmon.session import read_session
from stiffmon_agent import Agent
from stiffmon_agent.failure_hints import uses_reentrant_checkpoint
from stiffmon_agent.probe_set import make_probe
from tests.agent.recording import EVERY_STEP, metric_errors, offline_agent, train_step


class Checkpointed(nn.Module):
    """A small net whose middle block is checkpointed (reentrant or not)."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.a = nn.Linear(8, 10)
        self.b = nn.Sequential(nn.Linear(10, 10), nn.Tanh())
        self.fc = nn.Linear(10, 3)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.reentrant is not None:
            h = cp.checkpoint(self.b, h, use_reentrant=self.reentrant)
        else:
            h = self.b(h)
        out: torch.Tensor = self.fc(h)
        return out


def _run(model: nn.Module, rec: Path, forward: Any = None) -> Agent:
    """One training step of ``model`` with an agent measuring at it."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(12, 8), torch.arange(12) % 3
    loss_fn = nn.CrossEntropyLoss()
    agent = offline_agent(model, loss_fn, opt, rec, probe=(x, y), forward=forward, **EVERY_STEP)
    out = model(x)
    train_step(agent, opt, nn.functional.cross_entropy(out, y), out, y)
    agent.close()
    return agent


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_reentrant_checkpoint_failure_names_the_cause_and_the_fix(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rec = tmp_path / "r.stiff"
    agent = _run(Checkpointed(reentrant=True), rec)
    assert set(agent.disabled) == {"gram", "sharpness"}
    errors = metric_errors(read_session(rec)[0])
    assert "the per-example gradients cannot go through: use use_reentrant=False" in errors["gram"]
    assert "reentrant torch.utils.checkpoint" in errors["sharpness"]
    assert "use use_reentrant=False" in agent.disabled["sharpness"]


def test_non_reentrant_checkpoint_is_measured(tmp_path: Path) -> None:
    torch.manual_seed(0)
    agent = _run(Checkpointed(reentrant=False), tmp_path / "r.stiff")
    assert agent.disabled == {}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("reentrant", "found"), [(True, True), (False, False), (None, False)])
def test_detection_sees_only_reentrant_checkpoints(reentrant: bool | None, found: bool) -> None:
    torch.manual_seed(0)
    model = Checkpointed(reentrant)
    model.train()
    probe = make_probe((torch.randn(6, 8), torch.arange(6) % 3), None, None, None, None)
    before = [q.detach().clone() for q in model.parameters()]
    assert uses_reentrant_checkpoint(model, probe) is found
    assert model.training  # the model as it was
    assert all(torch.equal(a, q) for a, q in zip(before, model.parameters(), strict=True))
    assert all(q.grad is None for q in model.parameters())


def test_other_failures_get_no_checkpoint_hint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Checkpointed(reentrant=None)

    def forward(m: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not m.training:  # only inside measurements
            raise RuntimeError("unsupported layer XYZ")
        out: torch.Tensor = m(inputs)
        return out

    agent = _run(model, tmp_path / "r.stiff", forward)
    assert "XYZ" in agent.disabled["gram"]
    assert "checkpoint" not in agent.disabled["gram"]
