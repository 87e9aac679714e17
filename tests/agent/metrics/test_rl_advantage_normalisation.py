"""Advantages standardised inside ``loss_fn``: one example alone has a NaN loss, which is said.

REINFORCE's ``-(Â * log π(a|s))`` with Â = (A − mean A) / std A computed in the loss is finite on
the probe, but the unbiased std of one value is NaN, so the exact per-example paths (vmap, the
loop) gave a Gram of NaNs, which the agent reported as "the run is diverging".
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stiffmon_agent.metrics.alone_output import alone_loss_hint
from stiffmon_agent.metrics.chunk_coupling import chunking_changes_losses


def policy_loss(out: Tensor, y: tuple[Tensor, Tensor]) -> Tensor:
    actions, adv = y
    return -(adv * out.log_softmax(-1).gather(1, actions[:, None]).squeeze(1))


def normalised_inside(out: Tensor, y: tuple[Tensor, Tensor]) -> Tensor:
    actions, returns = y
    return policy_loss(out, (actions, (returns - returns.mean()) / returns.std()))


def rollout() -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    states = torch.randn(24, 6, dtype=torch.float64)
    actions = torch.randint(0, 3, (24,))
    returns = torch.randn(24, dtype=torch.float64)
    return policy, states, actions, returns


def test_advantages_normalised_in_the_loss_are_said() -> None:
    policy, states, actions, returns = rollout()
    hint = alone_loss_hint(policy, states, (actions, returns), normalised_inside, None)
    assert hint is not None
    assert "probe example 0's loss is nan alone" in hint
    assert "not diverging" in hint and "(A - A.mean()) / A.std()" in hint


def test_advantages_normalised_in_the_probe_are_not() -> None:
    policy, states, actions, returns = rollout()
    adv = (returns - returns.mean()) / returns.std()
    assert alone_loss_hint(policy, states, (actions, adv), policy_loss, None) is None


def test_a_diverged_probe_is_not_blamed_on_normalisation() -> None:
    policy, states, actions, returns = rollout()
    returns[3] = float("nan")
    assert alone_loss_hint(policy, states, (actions, returns), normalised_inside, None) is None


def test_chunks_that_normalise_apart_say_the_gram_is_uncertain_too() -> None:
    """In chunks of 8 the fast Gram normalised per chunk: Tr K 4.20 against the whole probe's
    4.67 (float64 loop), without a word; the chunk check's warning now names the Gram too."""
    policy, states, actions, returns = rollout()
    why = chunking_changes_losses(policy, states, (actions, returns), normalised_inside, None, 8)
    assert why is not None and "Stiffness and gradient noise" in why
    assert "normalise them where the probe is built" in why
