"""A fine-tuning stage that replaces the trainer's optimizer mid-fit (``trainer.strategy.optimizers
= [...]`` in a callback): the Lightning callback hands the agent the new optimizer, so the
recorded learning rates and thresholds are the new optimizer's from the step it first steps."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from stiffmon import protocol as p
from stiffmon.session import read_session

pl = pytest.importorskip(
    "lightning.pytorch", reason="needs lightning: pip install 'stiffmon[lightning]'"
)
pytest.importorskip("sklearn.datasets")

from stiffmon_agent.integrations.lightning import StiffmonCallback  # noqa: E402
from tests.agent.integrations.test_lightning import Digits, digits  # noqa: E402


class SwapAt(pl.Callback):  # type: ignore[misc]
    """Replaces the optimizer with SGD(lr=0.05) before the batch of global step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, i: int) -> None:
        if trainer.global_step == self.at:
            trainer.strategy.optimizers = [torch.optim.SGD(module.parameters(), lr=0.05)]


def test_a_replaced_trainer_optimizer_is_followed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = digits()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[:640], y[:640]), batch_size=64, shuffle=False
    )
    record = tmp_path / "swap.stiff"
    cb = StiffmonCallback(
        probe=(x[:20], y[:20]), endpoint="", record=str(record), gram_every="never",
        sharpness_every="every:2", density_every="never", overhead_cap=None,
    )  # fmt: skip
    trainer = pl.Trainer(
        max_steps=8, callbacks=[SwapAt(4), cb], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(Digits(lr=0.1), loader)
    msgs = read_session(record)[0]
    events = [m for m in msgs if isinstance(m, p.Event)]
    assert "optimizer-step-skipped" not in [e.code for e in events]
    (swap,) = [e for e in events if e.code == "optimizer-replaced"]
    assert swap.step == 4 and swap.attrs["optimizer"] == "SGD"  # its first step
    cols = [m for m in msgs if isinstance(m, p.Columns)]
    steps = np.concatenate([m.steps for m in cols]).tolist()
    lrs = np.concatenate([m.column("lr/0") for m in cols]).tolist()
    assert steps == list(range(8)) and lrs == [0.1] * 4 + [0.05] * 4
    thr = {
        m.step: float(m.values[m.names.index("sharpness/threshold")])
        for m in msgs
        if isinstance(m, p.Scalars) and "sharpness/threshold" in m.names
    }
    assert math.isclose(thr[2], 2 * 1.9 / 0.1) and math.isclose(thr[4], 2 / 0.05), thr
