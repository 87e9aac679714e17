"""Ctrl-C (SIGINT → ``KeyboardInterrupt``) in the middle of a measurement, as in a notebook.

A researcher interrupts a cell while the agent measures. Checked against references of our own:
the model afterwards is bitwise the model before (parameters, buffers, ``.grad`` objects and
values, ``training`` flags, ``requires_grad``, hooks, RNG states); training on gives losses
bit-identical to a run that never had an agent; every step keeps its number in the recording;
an event says which measurement was lost; a later sharpness equals the top eigenvalue of a dense
float64 Hessian (``torch.autograd.functional.hessian``).
"""

from __future__ import annotations

import copy
import random
import signal
import sys
from inspect import CO_GENERATOR
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from stiffmon import protocol as p
from stiffmon_agent.metrics.state import measurement_mode, optimized_only
from tests.agent.metrics.reference import dense_hessian_of
from tests.agent.recording import close_and_read, events, offline_agent, scalar_values, step_rows

STEPS, AT = 10, 4
_CALLS: dict[str, int] = {}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 10)
        self.bn = nn.BatchNorm1d(10)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(10, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.drop(torch.relu(self.bn(self.fc(x)))))


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(160, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (160,), generator=g
    )


def _make() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Net().double()
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _state(model: nn.Module) -> dict[str, Any]:
    """Everything a measurement must leave as it found it."""
    st: dict[str, Any] = {}
    for n, q in model.named_parameters():
        st[n] = (q.detach().clone(), q.requires_grad, id(q.grad), q.grad.detach().clone())
    for n, b in model.named_buffers():
        st["buf " + n] = b.detach().clone()
    for n, m in model.named_modules():
        st["mod " + n] = (m.training, len(m._forward_hooks), len(m._forward_pre_hooks))
    st["rng"] = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    st["flags"] = (torch.is_grad_enabled(), torch.get_default_dtype())
    return st


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor | np.ndarray):
        return bool((a == b).all()) and a.shape == b.shape
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


class _Only8:
    """A schedule due at step 8 only: the sharpness checked after the interrupt."""

    def due(self, step: int) -> bool:
        return step == 8


class _Interrupter:
    """Counts the Python calls into the agent's code from the start of the due measurements
    while on, and sends SIGINT to the process at the ``at``-th (a Ctrl-C part-way through a
    measurement: its set-up, forwards, Lanczos iterations, Gram rows or restoration)."""

    def __init__(self) -> None:
        self.calls, self.at, self.measuring = 0, 0, False

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event != "call" or "stiffmon_agent" not in frame.f_code.co_filename:
            return
        self.measuring |= frame.f_code.co_name == "_measure_due"
        if self.measuring:
            self.calls += 1
            # not into a generator: one closed by the garbage collector reports a Ctrl-C as
            # "Exception ignored" and drops it (Python's rule for finalizers, any code's)
            if self.at and self.calls >= self.at and not frame.f_code.co_flags & CO_GENERATOR:
                sys.setprofile(None)
                signal.raise_signal(signal.SIGINT)

    def on(self, at: int = 0) -> None:
        self.calls, self.at, self.measuring = 0, at, False
        sys.setprofile(self._profile)

    def off(self) -> None:
        sys.setprofile(None)


def _train(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, i: int) -> Tensor:
    idx = torch.arange(i * 16, i * 16 + 16) % len(x)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
    loss.backward()
    opt.step()
    return loss


def _run(kind: str, rec: Path, at_call: int) -> tuple[Any, ...]:
    """Train STEPS steps with an agent measuring ``kind`` at steps 0, 4, 8 (and the sharpness
    at 8), a Ctrl-C at the ``at_call``-th call of step AT's measurement (0: none, counted)."""
    x, y = _data()
    model, opt = _make()
    ctrl_c = _Interrupter()
    schedules: dict[str, Any] = {
        "gram_every": "never",
        "sharpness_every": _Only8(),
        "density_every": "never",
    }
    schedules[f"{kind}_every"] = "every:4"
    agent = offline_agent(
        model,
        nn.CrossEntropyLoss(reduction="none"),
        opt,
        rec,
        probe=(x[:40], y[:40]),
        overhead_cap=None,
        hessian_tol=1e-10,
        max_hvps=200,
        density_steps=12,
        **schedules,
    )
    losses, caught, before, after, lam, calls = [], [], {}, {}, None, 0
    for i in range(STEPS):
        loss = _train(model, opt, x, y, i)
        losses.append(loss.item())
        if i == AT:
            before = _state(model)
            ctrl_c.on(at_call)
        try:
            agent.step(loss)
        except KeyboardInterrupt:
            caught.append(i)
            after = _state(model)
        finally:
            ctrl_c.off()
        if i == AT:
            calls = ctrl_c.calls
        if i == 8 and at_call:  # the float64 reference of the sharpness measured at this step
            ev = copy.deepcopy(model).eval()
            h = dense_hessian_of(ev, x[:40], lambda out: nn.functional.cross_entropy(out, y[:40]))
            lam = float(torch.linalg.eigvalsh(h)[-1])
    msgs = close_and_read(agent, rec)
    return losses, caught, before, after, lam, msgs, calls


@pytest.mark.parametrize("at", [0.1, 0.7])
@pytest.mark.parametrize("kind", ["gram", "sharpness", "density"])
def test_ctrl_c_inside_a_measurement_loses_only_that_measurement(
    tmp_path: Path, kind: str, at: float
) -> None:
    x, y = _data()
    model, opt = _make()
    reference = [_train(model, opt, x, y, i).item() for i in range(STEPS)]  # no agent at all

    if kind not in _CALLS:  # the calls of step AT's measurement, counted in a run without Ctrl-C
        _CALLS[kind] = _run(kind, tmp_path / "count.stiff", 0)[-1]
    calls = _CALLS[kind]
    losses, caught, before, after, lam, msgs, _ = _run(
        kind, tmp_path / "run.stiff", max(1, round(at * calls))
    )

    assert caught == [AT], "the Ctrl-C reaches the notebook"
    assert _same(before, after), "the model is bitwise as before the measurement"
    assert losses == reference, "training on is bit-identical to a run without the agent"
    rows = step_rows(msgs)
    assert rows == list(enumerate(losses)), "every step keeps its number and its loss"
    said = events(msgs, "measurement-interrupted")
    assert [(e.step, e.attrs["metric"]) for e in said] == [(AT, kind)]
    assert not [m for m in msgs if isinstance(m, p.Scalars) and m.step == AT]
    assert lam is not None
    got = scalar_values(msgs, "sharpness/lambda1_h")[-1]
    assert got == pytest.approx(lam, rel=1e-7), f"ours {got} vs dense float64 {lam}"
    assert any(isinstance(m, p.Bye) for m in msgs)


def test_a_ctrl_c_during_the_restoration_waits_until_the_model_is_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(9, 4, max_norm=0.5), nn.Flatten(), nn.BatchNorm1d(8))
    model.train()
    t = torch.tensor([[1, 2], [3, 4], [5, 1]])
    model(t).sum().backward()
    before = _state(model)
    real = random.setstate

    def interrupted(state: Any) -> None:  # the first thing the restoration does
        real(state)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(random, "setstate", interrupted)
    with pytest.raises(KeyboardInterrupt), measurement_mode(model):
        with torch.no_grad():
            model[0].weight.mul_(10.0)  # as max_norm's renormalisation does, in place
        model(t)
    monkeypatch.setattr(random, "setstate", real)
    assert _same(before, _state(model))


def test_a_ctrl_c_while_unfreezing_leaves_no_parameter_frozen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    opt = torch.optim.SGD(model[1].parameters(), lr=0.1)  # model[0] is left out: frozen inside
    real = torch.Tensor.requires_grad_

    def interrupted(self: Tensor, requires_grad: bool = True) -> Tensor:
        out = real(self, requires_grad)
        if requires_grad:
            signal.raise_signal(signal.SIGINT)
        return out

    with pytest.raises(KeyboardInterrupt), optimized_only(model, opt):
        assert not model[0].weight.requires_grad
        monkeypatch.setattr(torch.Tensor, "requires_grad_", interrupted)
    monkeypatch.setattr(torch.Tensor, "requires_grad_", real)
    assert all(q.requires_grad for q in model.parameters())
