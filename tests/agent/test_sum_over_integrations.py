"""The integrations' own ``sum_over`` default (the loader's micro-batch) is not the user's: with a
mean-reduced loss it is silent, while a user's ``sum_over=`` passed through the callback warns.
A sum-reduced loss still gets the default: λ1_H = m λ_max(H_mean) against a float64 dense
Hessian (lr = 0, so θ is the reference's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from stiffmon.session import read_session
from tests.agent.metrics.reference import dense_hessian_of, rel_err
from tests.agent.recording import events, last_scalar

pl = pytest.importorskip("lightning.pytorch", reason="needs lightning")

from stiffmon_agent.integrations.lightning import StiffmonCallback  # noqa: E402

M = 8  # the loader's batch: the micro-batch a sum-reduced objective adds up


class Tiny(pl.LightningModule):
    def __init__(self, reduction: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        self.loss_fn = nn.CrossEntropyLoss(reduction=reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tmp_path: Path, reduction: str, **options: Any) -> tuple[list[Any], Tiny, Any]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 4, generator=g, dtype=torch.float64), torch.arange(32) % 3
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=M, shuffle=False
    )
    rec = tmp_path / f"{reduction}-{sorted(options)}.stiff"
    cb = StiffmonCallback(
        probe=(x[:12], y[:12]), endpoint="", record=str(rec), registry=False, gram_every="never",
        sharpness_every=1, overhead_cap=None, hessian_tol=1e-10, max_hvps=200, **options,
    )  # fmt: skip
    module = Tiny(reduction)
    trainer = pl.Trainer(
        max_steps=2, accumulate_grad_batches=2, callbacks=[cb], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(module, loader)
    return read_session(rec)[0], module, (x[:12], y[:12])


def test_lightning_default_sum_over_is_silent_and_a_users_warns(tmp_path: Path) -> None:
    msgs, _, _ = _fit(tmp_path, "mean")
    assert not events(msgs, "sum-over-ignored"), [
        e.message for e in events(msgs, "sum-over-ignored")
    ]
    msgs, _, _ = _fit(tmp_path, "mean", sum_over=5)
    (w,) = events(msgs, "sum-over-ignored")
    assert "sum_over=5 is ignored" in w.message


def test_lightning_default_sum_over_still_scales_a_sum_loss(tmp_path: Path) -> None:
    msgs, module, (x, y) = _fit(tmp_path, "sum")
    assert not events(msgs, "sum-over-ignored")
    h = dense_hessian_of(module.net, x, lambda out: nn.functional.cross_entropy(out, y))
    ref = M * float(torch.linalg.eigvalsh(h)[-1])
    ours = last_scalar(msgs, "sharpness/lambda1_h")
    err = rel_err(torch.tensor(ours), torch.tensor(ref))
    print(
        f"lightning sum loss, micro-batch {M}: λ1 ours {ours:.12g} vs {M}·dense {ref:.12g} "
        f"({err:.1e})"
    )
    assert err < 1e-8


def test_accelerate_default_sum_over_is_silent_and_a_users_warns(tmp_path: Path) -> None:
    """``AccelerateAgent(loader=...)`` sets ``sum_over`` to the loader's batch by default: no
    warning with a mean loss; the user's ``sum_over=`` with it warns."""
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    from stiffmon_agent.integrations.accelerate import AccelerateAgent

    model = nn.Linear(4, 3).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.arange(12) % 3
    loader = torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=M)
    said = {}
    for given in ({}, {"sum_over": 3}):
        rec = tmp_path / f"acc-{len(given)}.stiff"
        agent = AccelerateAgent(
            Accelerator(cpu=True), model, nn.CrossEntropyLoss(), None, loader=loader,
            probe=(x, y), endpoint="", record=rec, registry=False, **given,
        )  # fmt: skip
        agent.close()
        said[len(given)] = events(read_session(rec)[0], "sum-over-ignored")
    assert not said[0]
    assert len(said[1]) == 1 and "sum_over=3 is ignored" in said[1][0].message
