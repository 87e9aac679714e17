"""What the agent says where its curvature and noise numbers meet their limits: a Hessian whose
most negative eigenvalue dominates (a saddle), a probe of one example (no sample variance), a
probe of identical examples (Tr K within the Gram's rounding of 0)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from tests.agent.recording import (
    EXACT,
    close_and_read,
    events,
    last_scalar,
    offline_agent,
    scalar_values,
    train_step,
)

A = torch.diag(torch.tensor([1.0, -10.0, 0.5], dtype=torch.float64))


def saddle_loss(out: Tensor, y: Tensor) -> Tensor:
    """½ oᵀ A o per example: its Hessian in the weights has eigenvalues of both signs, the
    negative ones ten times the positive."""
    return 0.5 * ((out @ A.to(out.dtype)) * out).sum(1)


def run(tmp_path: Path, x: Tensor, dtype: torch.dtype = torch.float64) -> tuple[list, nn.Module]:
    torch.manual_seed(0)
    model = nn.Linear(5, 3, bias=False).to(dtype)
    x = x.to(dtype)
    y = torch.zeros(len(x), dtype=torch.long)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = tmp_path / "r.stiff"
    agent = offline_agent(model, saddle_loss, opt, rec, probe=(x, y), **EXACT)
    for _ in range(2):
        train_step(agent, opt, saddle_loss(model(x), y).mean())
    return close_and_read(agent, rec), model


def test_a_saddle_says_its_negative_curvature_dominates(tmp_path: Path) -> None:
    torch.manual_seed(1)
    x = torch.randn(8, 5, dtype=torch.float64)
    msgs, model = run(tmp_path, x)
    w = model.weight.detach().reshape(-1)
    dense = torch.autograd.functional.hessian(
        lambda f: saddle_loss(x @ f.view(3, 5).T, torch.zeros(8)).mean(), w
    )
    ev = torch.linalg.eigvalsh(dense)
    lam = last_scalar(msgs, "sharpness/lambda1_h")
    assert abs(lam - float(ev[-1])) <= 1e-8 * abs(float(ev[-1]))  # the largest, not −10×
    (note,) = events(msgs, "negative-curvature")  # said once, not at every measurement
    assert f"{float(ev[0]):.3g}" in note.message and "PyHessian" in note.message


def test_a_probe_of_one_example_says_there_is_no_noise_measure(tmp_path: Path) -> None:
    msgs, _ = run(tmp_path, torch.randn(1, 5))
    (off,) = events(msgs, "noise-off")
    assert "at least 2" in off.message and "has 1" in off.message
    assert not scalar_values(msgs, "noise/trace_k")


def test_identical_examples_give_tr_k_0_and_say_it_is_rounding(tmp_path: Path) -> None:
    """Four copies of one example in float32: the gradients agree to rounding, Tr K is 0 (it
    read ±1e-7 with a negative B_simple before), and the event says why."""
    msgs, _ = run(tmp_path, torch.randn(1, 5).repeat(4, 1), torch.float32)
    assert last_scalar(msgs, "noise/trace_k") == 0.0
    assert math.isnan(last_scalar(msgs, "noise/conditioning"))
    assert events(msgs, "noise-unresolved")
