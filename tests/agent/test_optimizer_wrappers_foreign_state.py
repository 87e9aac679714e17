"""An optimizer handed to the agent while a wrapper steps through it (timm's Lookahead, which
keeps its slow weights in the wrapped optimizer's state as ``lookahead_slow_buff``;
schedule-free's ``ScheduleFreeWrapper``, which keeps ``z`` there) does not step as its own
rule says: its bound is not assumed, and the ``threshold-none`` event says why. λ1_H itself is
checked against a dense float64 Hessian; the threshold of the steps before the wrapper first
writes its state, (2+2β)/η, by hand.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from stiffmon_agent.metrics import optimizer_kind as kinds
from tests.agent.metrics.reference import dense_hessian_of
from tests.agent.recording import EXACT, close_and_read, events, offline_agent, scalar_values


class TimmLookahead:
    """timm's ``Lookahead`` (Zhang et al. 2019): every k steps θ_s ← θ_s + α(θ − θ_s), θ ← θ_s,
    with θ_s in the base optimizer's state."""

    def __init__(self, base: torch.optim.Optimizer, alpha: float = 0.5, k: int = 3) -> None:
        self.base, self.alpha, self.k, self.n = base, alpha, k, 0

    @torch.no_grad()
    def step(self) -> None:
        self.base.step()
        self.n += 1
        if self.n % self.k:
            return
        for g in self.base.param_groups:
            for q in g["params"]:
                st = self.base.state[q]
                slow = st.setdefault("lookahead_slow_buff", q.detach().clone())
                slow.add_(q - slow, alpha=self.alpha)
                q.copy_(slow)


def test_the_inner_optimizer_of_a_wrapper_gets_no_bound(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dt = torch.float64
    x, y = torch.randn(48, 6, dtype=dt), torch.randint(0, 4, (48,))
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(dt)
    inner = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    wrapper = TimmLookahead(inner, k=3)
    rec = tmp_path / "la.stiff"
    agent = offline_agent(
        net, nn.CrossEntropyLoss(), inner, rec, probe=(x[:16], y[:16]), **EXACT,
        density_every="never",
    )  # fmt: skip
    ref = []
    for s in range(5):
        i = torch.arange(16) + 16 + 2 * s % 16
        loss = nn.functional.cross_entropy(net(x[i]), y[i])
        inner.zero_grad()
        loss.backward()
        wrapper.step()
        h = dense_hessian_of(net, x[:16], lambda out: nn.functional.cross_entropy(out, y[:16]))
        ref.append(float(torch.linalg.eigvalsh(h)[-1]))
        agent.step(loss)
    msgs = close_and_read(agent, rec)
    assert scalar_values(msgs, "sharpness/lambda1_h") == pytest.approx(ref, rel=1e-8)
    thr = scalar_values(msgs, "sharpness/threshold")
    assert thr[:2] == pytest.approx([(2 + 2 * 0.9) / 0.1] * 2)  # plain SGD steps so far
    assert all(math.isnan(t) for t in thr[2:])  # before: 38 at every step
    (why,) = events(msgs, "threshold-none")
    assert why.step == 2 and "'lookahead_slow_buff'" in why.message
    assert "give the agent the wrapper" in why.message


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("SGD", {"momentum": 0.9}),
        ("ASGD", {}),
        ("Adam", {"amsgrad": True}),
        ("AdamW", {}),
        ("Adamax", {}),
        ("NAdam", {}),
        ("RAdam", {}),
        ("RMSprop", {"momentum": 0.9, "centered": True}),
        ("Adagrad", {}),
        ("Adadelta", {}),
    ],
)
def test_torch_optimizers_own_state_is_not_foreign(name: str, kwargs: dict[str, Any]) -> None:
    w = nn.Parameter(torch.randn(3))
    opt = getattr(torch.optim, name)([w], lr=0.01, **kwargs)
    for _ in range(2):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    assert kinds.optimizer_kind(opt).rule == name and not kinds.optimizer_kind(opt).overridden
    opt.state[w]["z"] = w.detach().clone()  # a schedule-free wrapper's
    assert kinds.optimizer_kind(opt).overridden == name  # no bound now
    assert "'z'" in kinds.optimizer_kind(opt).why_none
