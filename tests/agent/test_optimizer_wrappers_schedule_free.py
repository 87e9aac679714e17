"""Schedule-free SGD (Defazio et al. 2024, the ``schedulefree`` package): the ``lr/0`` column
is the learning rate its built-in warm-up gives each step, λ1_H is measured at the point the
parameters hold at ``agent.step()`` (y, where its gradients are taken, in train mode; x after
``optimizer.eval()``), and its threshold is NaN with a reason.

:class:`ScheduleFreeSGD` is a line-by-line copy of ``schedulefree.SGDScheduleFree``'s update
and param-group keys (so the test needs no extra package); where the package is installed a
test checks that both give the same weights. λ1_H is checked against a dense float64 Hessian.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.agent.metrics.reference import dense_hessian_of
from tests.agent.recording import EXACT, close_and_read, events, offline_agent, scalar_values


class ScheduleFreeSGD(torch.optim.Optimizer):
    """``schedulefree.SGDScheduleFree`` (no weight decay): z ← z − η_k g(y);
    x ← (1 − c) x + c z with c = w_k / Σw (w_k = lr_max²); the parameters hold
    y = (1 − β) z + β x in train mode and x in eval mode; η_k = lr·min(1, (k+1)/warmup)."""

    def __init__(self, params: Any, lr: float, momentum: float = 0.9, warmup_steps: int = 0):
        defaults = dict(
            lr=lr, momentum=momentum, warmup_steps=warmup_steps, train_mode=False, k=0,
            weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0, weight_lr_power=2.0,
        )  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def eval(self) -> None:
        for g in self.param_groups:
            if g["train_mode"]:
                for q in g["params"]:
                    if "z" in self.state[q]:
                        q.lerp_(end=self.state[q]["z"], weight=1 - 1 / g["momentum"])
                g["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        for g in self.param_groups:
            if not g["train_mode"]:
                for q in g["params"]:
                    if "z" in self.state[q]:
                        q.lerp_(end=self.state[q]["z"], weight=1 - g["momentum"])
                g["train_mode"] = True

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        assert self.param_groups[0]["train_mode"], "call optimizer.train() first"
        for g in self.param_groups:
            k, w = g["k"], g["warmup_steps"]
            lr = g["lr"] * ((k + 1) / w if k < w else 1.0)
            g["scheduled_lr"] = lr
            g["lr_max"] = lr_max = max(lr, g["lr_max"])
            weight = lr_max ** g["weight_lr_power"]
            g["weight_sum"] = g["weight_sum"] + weight
            ckp1 = weight / g["weight_sum"] if g["weight_sum"] != 0 else 0
            for y in g["params"]:
                if y.grad is None:
                    continue
                z = self.state[y].setdefault("z", y.clone())
                y.lerp_(end=z, weight=ckp1)
                y.add_(y.grad, alpha=lr * (g["momentum"] * (1 - ckp1) - 1))
                z.sub_(y.grad, alpha=lr)
            g["k"] = k + 1


def _setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    dt = torch.float64
    x, y = torch.randn(48, 6, dtype=dt), torch.randint(0, 4, (48,))
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(dt), x, y


def _lambda1(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    h = dense_hessian_of(net, x, lambda out: nn.functional.cross_entropy(out, y))
    return float(torch.linalg.eigvalsh(h)[-1])


def _run(tmp_path: Path, opt_of: Callable[[nn.Module], Any], eval_first: bool, steps: int = 6):
    """A schedule-free loop (``train()``, step, then ``eval()`` where ``eval_first``, before
    ``agent.step``): the messages, the lr each step used, λ1 at y and at x after each step."""
    net, x, y = _setup()
    opt = opt_of(net)
    rec = tmp_path / "sf.stiff"
    agent = offline_agent(
        net, nn.CrossEntropyLoss(), opt, rec, probe=(x[:16], y[:16]), **EXACT,
        density_every="never",
    )  # fmt: skip
    used, at_y, at_x = [], [], []
    for s in range(steps):
        opt.train()
        i = torch.arange(16) + 16 + 2 * s % 16
        loss = nn.functional.cross_entropy(net(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        used.append(opt.param_groups[0]["scheduled_lr"])
        at_y.append(_lambda1(net, x[:16], y[:16]))
        opt.eval()
        at_x.append(_lambda1(net, x[:16], y[:16]))
        if not eval_first:
            opt.train()
        agent.step(loss)
    return close_and_read(agent, rec), used, at_y, at_x


def _lr_column(msgs: list[Any]) -> list[float]:
    from stiffmon import protocol as p

    return [v for m in msgs if isinstance(m, p.Columns) for v in m.column("lr/0").tolist()]


@pytest.mark.parametrize("eval_first", [False, True])
def test_lr_column_is_the_warmed_up_lr_and_lambda1_is_at_the_parameters_point(
    tmp_path: Path, eval_first: bool
) -> None:
    msgs, used, at_y, at_x = _run(
        tmp_path, lambda n: ScheduleFreeSGD(n.parameters(), lr=0.5, warmup_steps=4), eval_first
    )
    assert used[:5] == [0.125, 0.25, 0.375, 0.5, 0.5]
    assert _lr_column(msgs) == pytest.approx(used, rel=1e-12)  # before: 0.5 at every step
    lam = scalar_values(msgs, "sharpness/lambda1_h")
    ref, other = (at_x, at_y) if eval_first else (at_y, at_x)
    assert lam == pytest.approx(ref, rel=1e-8)
    assert abs(lam[-1] - other[-1]) > 1e-4 * other[-1]  # y and x differ: the right one is read
    assert all(math.isnan(t) for t in scalar_values(msgs, "sharpness/threshold"))
    (why,) = events(msgs, "threshold-none")
    assert "no stability rule known for ScheduleFreeSGD" in why.message


def test_the_copy_steps_as_the_package_does() -> None:
    sf = pytest.importorskip("schedulefree")
    nets = [_setup()[0] for _ in range(2)]
    x, y = _setup()[1:]
    opts = [
        ScheduleFreeSGD(nets[0].parameters(), lr=0.5, warmup_steps=4),
        sf.SGDScheduleFree(nets[1].parameters(), lr=0.5, warmup_steps=4),
    ]
    for _ in range(6):
        for net, opt in zip(nets, opts, strict=True):
            opt.train()
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
