"""The Lightning callback: a real Trainer run on the digits, read back by ``stiffmon summary``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stiffmon.session import SessionReader
from stiffmon.store import Store

pl = pytest.importorskip(
    "lightning.pytorch", reason="needs lightning: pip install 'stiffmon[lightning]'"
)
sklearn_datasets = pytest.importorskip("sklearn.datasets")

from stiffmon_agent.integrations.lightning import StiffmonCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]


class Digits(pl.LightningModule):
    def __init__(self, reduction: str = "mean", lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        self.loss_fn = nn.CrossEntropyLoss(reduction=reduction)
        self.lr = lr
        self.batch_losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.batch_losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = sklearn_datasets.load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    return x, torch.tensor(d.target, dtype=torch.long)


def fit(
    tmp_path: Path, accumulate: int, steps: int, reduction: str = "mean", lr: float = 0.1
) -> tuple[Path, Digits, StiffmonCallback]:
    torch.manual_seed(0)
    x, y = digits()
    probe_idx = torch.cat([torch.nonzero(y == c)[:4, 0] for c in range(10)])
    val_idx = torch.cat([torch.nonzero(y == c)[-3:, 0] for c in range(10)])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[:1500], y[:1500]), batch_size=32, shuffle=False
    )
    record = tmp_path / f"lightning-{reduction}.stiff"
    cb = StiffmonCallback(
        probe=(x[probe_idx], y[probe_idx]),
        val_probe=(x[val_idx], y[val_idx]),
        run="lightning digits",
        endpoint="",
        record=str(record),
        gram_every="every:4",
        sharpness_every="every:4",
        overhead_cap=None,
    )
    module = Digits(reduction, lr)
    trainer = pl.Trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, loader)
    return record, module, cb


@pytest.mark.slow
def test_lightning_run_is_recorded_and_summarised(tmp_path: Path) -> None:
    steps, acc = 12, 2
    record, module, cb = fit(tmp_path, accumulate=acc, steps=steps)
    assert cb.agent is None  # closed at the end
    store = Store()
    store.extend(SessionReader(record), replay=True)
    (rd,) = store.runs.values()
    assert rd.name == "lightning digits"
    assert rd.finished
    assert rd.batch_size == 32 * acc
    loss = rd.scalars["loss"]
    # One agent step per optimizer step, not per micro-batch ...
    assert loss.steps.tolist() == list(range(steps))
    # ... with the mean of that step's micro-batch losses (measured independently in the module).
    expected = np.asarray(module.batch_losses).reshape(steps, acc).mean(axis=1)
    np.testing.assert_allclose(loss.values, expected, rtol=1e-5)
    assert rd.scalars["momentum/0"].last() == pytest.approx(0.9)

    out = subprocess.run(
        [sys.executable, "-m", "stiffmon", "summary", str(record), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    (row,) = json.loads(out.stdout)
    assert row["steps"] == steps
    assert row["peak_lambda1_h"] is not None and row["peak_lambda1_h"] > 0
    assert row["within_minus_between"] is not None and math.isfinite(row["within_minus_between"])
    assert row["peak_lambda1_k"] is not None and row["peak_lambda1_k"] > 0
    assert "stiffness/cos/train-val" in rd.matrices
    assert len(rd.scalars["sharpness/lambda1_h"]) == 3  # steps 0, 4, 8


def test_an_epochs_last_short_accumulation_gets_the_mean_loss(tmp_path: Path) -> None:
    """5 batches an epoch, accumulate 2: each epoch's third step has one micro-batch, which
    Lightning still divides by 2; the published loss is the mean of the step's micro-batches."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 4), torch.randint(0, 2, (40,))
    micro: list[float] = []

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 2)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], i: int) -> torch.Tensor:
            loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            micro.append(float(loss))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    record = tmp_path / "short.stiff"
    cb = StiffmonCallback(endpoint="", record=str(record), registry=False)
    trainer = pl.Trainer(
        max_epochs=2, accumulate_grad_batches=2, callbacks=[cb], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=8)
    trainer.fit(Tiny(), loader)
    store = Store()
    store.extend(SessionReader(record), replay=True)
    (rd,) = store.runs.values()
    groups = [micro[0:2], micro[2:4], micro[4:5], micro[5:7], micro[7:9], micro[9:10]]
    assert rd.scalars["loss"].steps.tolist() == list(range(6))
    np.testing.assert_allclose(rd.scalars["loss"].values, [np.mean(g) for g in groups], rtol=1e-6)


def test_unknown_option_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="unknown Agent option 'prob'"):
        StiffmonCallback(prob=None)
    with pytest.raises(TypeError, match="from the framework"):
        StiffmonCallback(optimizer=None)
    # built on rank 0 only: sharded measurement would wait for the other ranks for ever
    with pytest.raises(ValueError, match=r"distributed=True .* needs an Agent on every rank"):
        StiffmonCallback(distributed=True)


def test_importing_stiffmon_does_not_import_frameworks() -> None:
    code = (
        "import sys, stiffmon, stiffmon.cli, stiffmon_agent, stiffmon_agent.integrations\n"
        "names = ('lightning', 'pytorch_lightning', 'transformers')\n"
        "bad = [m for m in names if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_under_ddp_only_rank_zero_publishes(tmp_path: Path) -> None:
    """Two CPU processes (gloo): one run in the recording, one agent step per optimizer step."""
    x, y = digits()
    record = tmp_path / "ddp.stiff"
    cb = StiffmonCallback(
        probe=(x[:20], y[:20]),
        run="ddp",
        endpoint="",
        record=str(record),
        gram_every="every:3",
        sharpness_every="every:3",
        overhead_cap=None,
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[:512], y[:512]), batch_size=32
    )
    trainer = pl.Trainer(
        max_steps=6,
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Digits(), loader)
    store = Store()
    store.extend(SessionReader(record), replay=True)
    (rd,) = store.runs.values()  # rank 1 built no agent
    assert rd.finished and rd.batch_size == 32 * 2
    assert rd.scalars["loss"].steps.tolist() == list(range(6))
    assert len(rd.scalars["sharpness/lambda1_h"]) == 2 and len(rd.scalars["noise/trace_k"]) == 2
    assert not [e for e in rd.events if e.level == "error"], [e.message for e in rd.events]


@pytest.mark.slow
def test_a_sum_loss_under_accumulation_is_the_sum_over_one_micro_batch(tmp_path: Path) -> None:
    """Lightning divides each micro-batch's loss by the accumulation: a sum-reduced objective
    adds up 32 examples' losses (the loader's batch), not B = 32 × 2. With lr = 0 the weights
    stay put, so λ1_H of the sum run is 32 × the mean run's."""
    lam = {}
    for reduction in ("mean", "sum"):
        record, _, _ = fit(tmp_path, accumulate=2, steps=2, reduction=reduction, lr=0.0)
        store = Store()
        store.extend(SessionReader(record), replay=True)
        (rd,) = store.runs.values()
        s = rd.series("sharpness/lambda1_h")
        assert s is not None and len(s)
        lam[reduction] = float(s.values[0])
        assert rd.hello is not None and rd.hello.batch_size == 64  # η/B keeps the whole batch
    assert lam["sum"] == pytest.approx(32 * lam["mean"], rel=2e-2)
