"""Policy-gradient objectives through the agent, against float64 references.

An example is one transition (state; action, advantage …): the probe holds the states as inputs
and a tuple of per-transition constants as targets, and ``loss_fn`` returns each transition's
surrogate. REINFORCE's −Â log π(a|s) and PPO's clipped surrogate with a value head and an entropy
bonus then give Tr K, λ1_K and λ1_H of the objective the optimizer steps on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tests.agent.metrics.reference import dense_hessian_of, loop_gradients
from tests.agent.recording import EXACT, close_and_read, last_scalar, offline_agent, train_step


class ActorCritic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 16), nn.Tanh())
        self.pi, self.v = nn.Linear(16, 4), nn.Linear(16, 1)

    def forward(self, s: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(s)
        return self.pi(h), self.v(h).squeeze(-1)


def ppo(out: tuple[Tensor, Tensor], y: tuple[Tensor, ...]) -> Tensor:
    """Per-transition clipped surrogate + 0.5 × value error − 0.01 × entropy."""
    (logits, v), (a, adv, old_logp, ret) = out, y
    logp_all = logits.log_softmax(-1)
    ratio = (logp_all.gather(1, a[:, None]).squeeze(1) - old_logp).exp()
    surrogate = torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return -surrogate + 0.5 * (v - ret) ** 2 - 0.01 * entropy


def reinforce(out: Tensor, y: tuple[Tensor, Tensor]) -> Tensor:
    a, adv = y
    return -(adv * out.log_softmax(-1).gather(1, a[:, None]).squeeze(1))


def transitions(model: nn.Module, n: int, ppo_targets: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
    s = torch.randn(n, 5, dtype=torch.float64)
    with torch.no_grad():
        out = model(s)
        logits = out[0] if ppo_targets else out
        a = torch.distributions.Categorical(logits=logits).sample()
        old = logits.log_softmax(-1).gather(1, a[:, None]).squeeze(1)
    ret = s[:, 0] + (a == 1).double()
    adv = ret - ret.mean()
    adv = adv / adv.std()  # normalised here, over the batch: constants to the optimizer
    return s, ((a, adv, old, ret) if ppo_targets else (a, adv))


def check(model: nn.Module, loss_fn: Any, ppo_targets: bool, tmp_path: Path) -> None:
    probe = transitions(model, 20, ppo_targets)
    with torch.no_grad():  # move off the sampling policy: PPO's ratios leave the clip range
        for q in model.parameters():
            q.add_(0.3 * torch.randn_like(q))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = tmp_path / "rl.stiff"
    agent = offline_agent(model, loss_fn, opt, rec, probe=probe, **EXACT)
    for _ in range(2):
        s, y = transitions(model, 32, ppo_targets)
        train_step(agent, opt, loss_fn(model(s), y).mean())
    msgs = close_and_read(agent, rec)
    model.eval()
    g = loop_gradients(model, probe[0], _Rows(probe[1]), loss_fn)
    d = g - g.mean(0)
    trace_k = float((d * d).sum() / 20)
    lambda1_k = float(torch.linalg.eigvalsh(d @ d.T / 20)[-1])
    hess = dense_hessian_of(model, probe[0], lambda out: loss_fn(out, probe[1]).mean())
    lambda1_h = float(torch.linalg.eigvalsh(hess)[-1])
    assert abs(last_scalar(msgs, "noise/trace_k") / trace_k - 1) < 1e-10
    assert abs(last_scalar(msgs, "noise/lambda1_k") / lambda1_k - 1) < 1e-10
    assert abs(last_scalar(msgs, "sharpness/lambda1_h") / lambda1_h - 1) < 1e-8


class _Rows:
    """Tuple targets sliced row-wise, as the reference loop slices a tensor."""

    def __init__(self, parts: tuple[Tensor, ...]) -> None:
        self.parts, self.shape = parts, parts[0].shape

    def __getitem__(self, rows: slice) -> tuple[Tensor, ...]:
        return tuple(t[rows] for t in self.parts)


def test_reinforce_matches_float64_references(tmp_path: Path) -> None:
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    check(policy, reinforce, False, tmp_path)


def test_ppo_actor_critic_matches_float64_references(tmp_path: Path) -> None:
    torch.manual_seed(1)
    check(ActorCritic().double(), ppo, True, tmp_path)
