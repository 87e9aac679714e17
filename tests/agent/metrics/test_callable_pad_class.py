"""A plain callable loss that ignores a padding id inside the classes (token id 0).

The agent takes -100 for a plain callable's ignore index. A language model padded with token 0
and trained on ``lambda out, y: F.cross_entropy(out.reshape(-1, V), y.reshape(-1),
ignore_index=0, reduction="none")`` returns 0 at the padding, which then counted in each
example's mean: λ1_H came out 37 % low (6.60 against 10.43, the share of counted positions)
with nothing said. 0 is one of the outputs' classes, so the refusal of targets outside them did
not catch it; now a class whose every position has a loss of exactly 0 (and no other position
does) while the outputs give it no certainty there is refused with the way out, and declared
(``loss_fn.ignore_index = 0``) it is measured as torch's mean-reduced loss, against a float64
dense Hessian. A model that predicts a class with certainty (a loss of exactly 0 that is real)
is not refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon_agent.metrics.probe import per_example_losses, unreduced
from tests.agent.metrics.reference import dense_hessian_of
from tests.agent.recording import (
    EXACT,
    close_and_read,
    events,
    last_scalar,
    offline_agent,
    scalar_values,
    train_step,
)

V, N, T, PAD = 5, 8, 6, 0


def _setup() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(V, 4), nn.Tanh(), nn.Linear(4, V)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, V, (N, T), generator=g)
    y = torch.randint(1, V, (N, T), generator=g)
    for i in range(N):  # sequence i has 2 + i % 4 real tokens, then padding
        x[i, 2 + i % 4 :] = PAD
        y[i, 2 + i % 4 :] = PAD
    return model, x, y


def _per_token(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out.reshape(-1, V), y.reshape(-1), ignore_index=PAD, reduction="none")


def _record(tmp_path: Path, loss_fn: Any) -> tuple[nn.Module, Tensor, Tensor, list[Any]]:
    model, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay where the refs are
    rec = tmp_path / "lm.stiff"
    agent = offline_agent(model, loss_fn, opt, rec, probe=(x, y), **EXACT)
    loss = _per_token(model(x), y).sum() / (y != PAD).sum()  # what the loop trains on
    train_step(agent, opt, loss)
    return model, x, y, close_and_read(agent, rec)


def test_a_padding_class_ignored_inside_a_lambda_is_refused(tmp_path: Path) -> None:
    _, _, _, msgs = _record(tmp_path, lambda out, y: _per_token(out, y))
    errors = [e.message for e in events(msgs, "metric-error")]
    assert len(errors) == 2, errors  # the Gram and the sharpness, not a scaled-down number
    for text in errors:
        assert "target is class 0" in text and "loss_fn.ignore_index = 0" in text
    assert scalar_values(msgs, "sharpness/lambda1_h") == []


def test_the_declared_padding_class_is_measured_as_torchs_mean(tmp_path: Path) -> None:
    def loss(out: Tensor, y: Tensor) -> Tensor:
        return _per_token(out, y)

    loss.ignore_index = PAD  # type: ignore[attr-defined]
    model, x, y, msgs = _record(tmp_path, loss)
    assert not events(msgs, "metric-error")
    model.eval()
    objective = lambda out: F.cross_entropy(out.reshape(-1, V), y.reshape(-1), ignore_index=PAD)  # noqa: E731
    lam = float(torch.linalg.eigvalsh(dense_hessian_of(model, x, objective))[-1])
    assert last_scalar(msgs, "sharpness/lambda1_h") == pytest.approx(lam, rel=1e-6)


def test_a_class_predicted_with_certainty_is_not_refused() -> None:
    """Losses of exactly 0 at every position of class 0 that the outputs predict with
    certainty (a logit 1000 above the rest): real zeros, nothing is ignored."""
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, V, (N, T), generator=g)
    y[:, 0] = 0
    out = torch.randn(N, T, V, generator=g, dtype=torch.float64)
    out[..., 0] = torch.where(y == 0, 1000.0, out[..., 0])
    fn = unreduced(lambda o, t: F.cross_entropy(o.reshape(-1, V), t.reshape(-1), reduction="none"))
    losses = per_example_losses(fn, out, y, N)
    assert losses.shape == (N,) and bool((losses > 0).all())


def test_a_margin_losss_real_zeros_at_one_class_are_not_refused() -> None:
    """A multi-class hinge loss is exactly 0 where the margin is met: every example of class 0
    beyond it (and no other) while p_0 < 1 there is a real loss of 0, not an ignored class."""
    g = torch.Generator().manual_seed(3)
    y = torch.arange(N * T).reshape(N, T) % V
    out = torch.randn(N, T, V, generator=g, dtype=torch.float64) * 0.1
    out[..., 0] = torch.where(y == 0, 2.0, out[..., 0])  # margin 1 met, p_0 ≈ 0.7
    fn = unreduced(
        lambda o, t: F.multi_margin_loss(o.reshape(-1, V), t.reshape(-1), reduction="none")
    )
    per_position = F.multi_margin_loss(out.reshape(-1, V), y.reshape(-1), reduction="none")
    assert bool((per_position[y.reshape(-1) == 0] == 0).all())
    assert bool((per_position[y.reshape(-1) != 0] > 0).all())
    losses = per_example_losses(fn, out, y, N)
    assert losses.shape == (N,) and bool((losses > 0).all())
