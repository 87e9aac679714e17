"""A backbone "frozen" by a zero learning rate: a param group at η = 0 whose parameters keep
``requires_grad=True``.

The step θ_g ← θ_g − η_g ∇_g L leaves such a group where it is, so the geometry of the step is
that of the moving parameters alone: λ1_H compared with the moving group's 2/η, Tr K and the
Gram over the moving parameters. Before the fix the still group was measured with the rest:
λ1_H and Tr K read the whole model's, against the moving group's threshold. When every group
is at η = 0 (the first step of a warm-up from 0) nothing moves and the model is measured
whole. Each value is checked against a dense float64 Hessian / per-example gradient loop over
the parameters the reference says move.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tests.agent.metrics.reference import dense_hessian_of, loop_gradients
from tests.agent.recording import close_and_read, offline_agent, scalar_values, train_step


def _refs(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, moving: set[str]
) -> tuple[float, float]:
    """(λ1 of the dense Hessian, Tr K from the per-example gradients), both over ``moving``."""
    m = copy.deepcopy(net)
    for n, q in m.named_parameters():
        q.requires_grad_(n in moving)
    h = dense_hessian_of(m, x, lambda out: nn.functional.cross_entropy(out, y))
    g = loop_gradients(m, x, y, lambda out, t: nn.functional.cross_entropy(out, t))
    gc = g - g.mean(0)
    return float(torch.linalg.eigvalsh(h)[-1]), float(gc.square().sum() / g.shape[0])


def _setup(tmp_path: Path, lrs: tuple[float, float]) -> tuple[Any, ...]:
    """(x, y, net, its SGD with a backbone group and a head group at ``lrs``, agent, rec)."""
    torch.manual_seed(0)
    dt = torch.float64
    x, y = torch.randn(40, 6, dtype=dt), torch.randint(0, 3, (40,))
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dt)
    with torch.no_grad():
        net[2].weight.mul_(0.25)  # a flat head: the backbone holds the top curvature
    opt = torch.optim.SGD(
        [{"params": list(net[0].parameters()), "lr": lrs[0]},
         {"params": list(net[2].parameters()), "lr": lrs[1]}]
    )  # fmt: skip
    rec = tmp_path / "r.stiff"
    agent = offline_agent(
        net, nn.CrossEntropyLoss(), opt, rec, probe=(x[:16], y[:16]), gram_every=1,
        sharpness_every=1, density_every="never", overhead_cap=None, hessian_tol=1e-10,
        max_hvps=200,
    )  # fmt: skip
    return x, y, net, opt, agent, rec


def _run(tmp_path: Path, lrs: list[tuple[float, float]]) -> tuple[dict[str, list[float]], list]:
    x, y, net, opt, agent, rec = _setup(tmp_path, lrs[0])
    refs = []
    for back, head in lrs:
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = back, head
        out = net(x[16:])
        train_step(agent, opt, nn.functional.cross_entropy(out, y[16:]), out, y[16:])
        moving = {"2.weight", "2.bias"} | ({"0.weight", "0.bias"} if back or not head else set())
        refs.append(_refs(net, x[:16], y[:16], moving))
    msgs = close_and_read(agent, rec)
    got = {
        n: scalar_values(msgs, n)
        for n in ("sharpness/lambda1_h", "sharpness/threshold", "noise/trace_k")
    }
    return got, refs


def test_a_zero_lr_group_is_left_out_until_it_moves(tmp_path: Path) -> None:
    got, refs = _run(tmp_path, [(0.0, 0.1), (0.0, 0.1), (0.05, 0.1)])
    for s, (lam, trace_k) in enumerate(refs):
        assert math.isclose(got["sharpness/lambda1_h"][s], lam, rel_tol=1e-6), s
        assert math.isclose(got["noise/trace_k"][s], trace_k, rel_tol=1e-9), s
    assert got["sharpness/threshold"][0] == 20.0  # the moving head's 2/η


def test_every_group_at_zero_lr_measures_the_whole_model(tmp_path: Path) -> None:
    got, refs = _run(tmp_path, [(0.0, 0.0), (0.0, 0.1)])
    for s, (lam, trace_k) in enumerate(refs):
        assert math.isclose(got["sharpness/lambda1_h"][s], lam, rel_tol=1e-6), s
        assert math.isclose(got["noise/trace_k"][s], trace_k, rel_tol=1e-9), s
    assert math.isnan(got["sharpness/threshold"][0])


def test_a_scheduler_stepped_before_agent_step_does_not_count_the_next_lr(tmp_path: Path) -> None:
    """The measured step used η = 0 for the backbone; a ``scheduler.step()`` between
    ``optimizer.step()`` and ``agent.step()`` raising it for the next step does not make the
    backbone count as moving at this one (the rule reads the lr the step used)."""
    x, y, net, opt, agent, rec = _setup(tmp_path, (0.0, 0.1))
    loss = nn.functional.cross_entropy(net(x[16:]), y[16:])
    opt.zero_grad()
    loss.backward()
    opt.step()
    opt.param_groups[0]["lr"] = 0.05  # the scheduler, for the next step
    agent.step(loss)
    lam, trace_k = _refs(net, x[:16], y[:16], {"2.weight", "2.bias"})
    msgs = close_and_read(agent, rec)
    assert math.isclose(scalar_values(msgs, "sharpness/lambda1_h")[0], lam, rel_tol=1e-6)
    assert math.isclose(scalar_values(msgs, "noise/trace_k")[0], trace_k, rel_tol=1e-9)
