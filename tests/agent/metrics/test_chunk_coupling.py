"""The Hessian runs the probe in chunks of ``chunk_size``; where the examples' losses depend on
the batch (BatchNorm without running statistics, capacity-limited experts), the chunks'
objective is not the probe's (λ1_H 0.5 % low on a capacity-limited MoE, 12 examples in chunks
of 6), while one chunk matches the whole probe's dense Hessian: a ``hessian-chunked`` warning
says so (before, nothing did). Models whose examples are
independent, in float64 and float32 and with a token-weighted loss, get no warning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon_agent.metrics.chunk_coupling import chunking_changes_losses
from tests.agent.metrics.models import TokenLM
from tests.agent.metrics.reference import dense_hessian_of
from tests.agent.recording import (
    EVERY_STEP,
    EXACT,
    close_and_read,
    events,
    last_scalar,
    offline_agent,
    train_step,
)


def batch_norm_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Tanh(), nn.Linear(6, 3)
    )


def record(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Any, tmp_path: Path, chunk: int | None):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = tmp_path / f"run{chunk}.stiff"
    exact = EXACT if chunk is None else EVERY_STEP | {"max_hvps": 6}  # the chunks: its warning
    settings = exact | {"gram_every": "never", "chunk_size": chunk}
    agent = offline_agent(model, loss_fn, opt, rec, probe=(x, y), **settings)
    out = model(x)
    train_step(agent, opt, loss_fn(out, y), out, y)
    return close_and_read(agent, rec)


def test_a_batch_coupled_model_in_chunks_is_warned_and_one_chunk_matches_the_dense_hessian(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = batch_norm_mlp().double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    chunked = record(model, x, y, nn.CrossEntropyLoss(), tmp_path, 5)
    whole = record(model, x, y, nn.CrossEntropyLoss(), tmp_path, None)
    model.eval()  # as measured (batch statistics all the same: no running ones)
    h = dense_hessian_of(model, x, lambda out: F.cross_entropy(out, y))
    want = float(torch.linalg.eigvalsh(h)[-1])
    assert abs(last_scalar(whole, "sharpness/lambda1_h") - want) < 1e-8 * want
    (warned,) = events(chunked, "hessian-chunked")  # the chunks' objective is another one
    assert "chunk_size=12" in warned.message
    assert not events(whole, "hessian-chunked")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_independent_examples_in_chunks_are_not_warned(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    x, y = torch.randn(13, 4, dtype=dtype), torch.randint(0, 3, (13,))
    assert chunking_changes_losses(mlp, x, y, nn.CrossEntropyLoss(), None, 4) is None
    lm = TokenLM().to(dtype)
    tokens, tags = torch.randint(0, 7, (13, 5)), torch.randint(0, 7, (13, 5))
    tags[::3, 3:] = -100

    def fwd(m: nn.Module, t: Tensor) -> Tensor:
        return m(t).transpose(1, 2)

    assert chunking_changes_losses(lm, tokens, tags, nn.CrossEntropyLoss(), fwd, 4) is None
    coupled = batch_norm_mlp().to(dtype)
    found = chunking_changes_losses(coupled, x[:12], y[:12], nn.CrossEntropyLoss(), None, 4)
    assert found is not None and "chunks of 4" in found


def test_a_random_forward_is_not_taken_for_coupling() -> None:
    """A forward that draws random numbers in eval mode (dropout forced on) differs between any
    two passes: that is no coupling of the examples, and the check says nothing."""

    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

        def forward(self, x: Tensor) -> Tensor:
            return self.net(F.dropout(x, 0.3, training=True))

    torch.manual_seed(0)
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    model = Noisy().double()
    assert chunking_changes_losses(model, x, y, nn.CrossEntropyLoss(), None, 4) is None


def test_the_check_runs_at_the_first_and_every_tenth_measurement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two forward passes over the probe per check: not at every sharpness measurement."""
    import stiffmon_agent.measure as measure

    calls: list[int] = []

    def counted(*args: Any) -> str | None:
        calls.append(1)
        return None

    monkeypatch.setattr(measure, "chunking_changes_losses", counted)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = tmp_path / "every.stiff"
    settings = EVERY_STEP | {"gram_every": "never", "chunk_size": 5, "max_hvps": 4}
    agent = offline_agent(model, nn.CrossEntropyLoss(), opt, rec, probe=(x, y), **settings)
    for _ in range(12):
        out = model(x)
        train_step(agent, opt, F.cross_entropy(out, y), out, y)
    msgs = close_and_read(agent, rec)
    assert len([m for m in msgs if type(m).__name__ == "Spectrum"]) == 12
    assert len(calls) == 2  # steps 0 and 10
