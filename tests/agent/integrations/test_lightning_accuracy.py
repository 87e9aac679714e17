"""The Lightning callback's accuracy (from ``training_step``'s logits, over every micro-batch of
an optimizer step), its ``accuracy-off`` event, and a fit resumed from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stiffmon.session import SessionReader
from stiffmon.store import RunData, Store

pl = pytest.importorskip(
    "lightning.pytorch", reason="needs lightning: pip install 'stiffmon[lightning]'"
)

from stiffmon_agent.integrations.lightning import (  # noqa: E402
    StiffmonCallback,
    batch_targets,
)


class Classifier(pl.LightningModule):
    """Three classes of four features; ``give`` says what ``training_step`` returns: the loss
    alone, a dict with the logits, or with the logits and targets (a third of them −100)."""

    def __init__(self, give: str) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)
        self.loss_fn = nn.CrossEntropyLoss()
        self.give = give
        self.micro: list[tuple[int, int]] = []  # (hits, counted targets) per micro-batch

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], i: int) -> object:
        x, y = batch
        if self.give == "targets":
            y = y.clone()
            y[::3] = -100  # not predictions: neither hits nor misses
        logits = self.net(x)
        loss = self.loss_fn(logits, y)
        keep = y >= 0
        hits = int(((logits.argmax(1) == y) & keep).sum())
        self.micro.append((hits, int(keep.sum())))
        if self.give == "loss":
            return loss
        out = {"loss": loss, "logits": logits}
        return {**out, "targets": y} if self.give == "targets" else out

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def data() -> torch.utils.data.DataLoader[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 4, generator=g), torch.randint(0, 3, (48,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def trainer(cb: StiffmonCallback, **kwargs: object) -> pl.Trainer:
    return pl.Trainer(
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        **kwargs,
    )


def runs(record: Path) -> list[RunData]:
    store = Store()
    store.extend(SessionReader(record), replay=True)
    return list(store.runs.values())


@pytest.mark.parametrize("give", ["logits", "targets"])
def test_accuracy_counts_every_micro_batch_of_the_step(tmp_path: Path, give: str) -> None:
    """6 micro-batches an epoch, accumulate 2, two epochs: each step's accuracy is the hits of
    both its micro-batches over their counted targets, as the module counted them."""
    torch.manual_seed(0)
    record = tmp_path / "acc.stiff"
    cb = StiffmonCallback(endpoint="", record=str(record), registry=False)
    module = Classifier(give)
    trainer(cb, max_epochs=2, accumulate_grad_batches=2).fit(module, data())
    (rd,) = runs(record)
    hits, counted = np.asarray(module.micro, dtype=float).T.reshape(2, -1, 2)
    expected = hits.sum(axis=1) / counted.sum(axis=1)
    accuracy = rd.scalars["accuracy"]
    assert accuracy.steps.tolist() == list(range(6))
    np.testing.assert_allclose(accuracy.values, expected, rtol=1e-12)
    last_only = hits[:, 1] / counted[:, 1]
    assert not np.allclose(expected, last_only)  # what the step's last micro-batch alone gives
    assert not [e for e in rd.events if e.code == "accuracy-off"]


def test_without_logits_the_run_says_how_to_get_an_accuracy(tmp_path: Path) -> None:
    record = tmp_path / "off.stiff"
    cb = StiffmonCallback(endpoint="", record=str(record), registry=False)
    trainer(cb, max_steps=4).fit(Classifier("loss"), data())
    (rd,) = runs(record)
    assert "accuracy" not in rd.scalars
    (event,) = [e for e in rd.events if e.code == "accuracy-off"]  # once, not every step
    assert event.level == "info" and event.step == 0
    assert '"logits": logits' in event.message and "training_step" in event.message


def test_batch_targets() -> None:
    x, y = torch.zeros(2, 3), torch.tensor([1, 0])
    assert batch_targets((x, y)) is y and batch_targets([x, y, x]) is y
    assert batch_targets({"x": x, "labels": y}) is y and batch_targets({"x": x}) is None
    assert batch_targets(x) is None and batch_targets((x, 3)) is None


@pytest.mark.parametrize("run", [None, "tiny"])
def test_a_resumed_fit_is_a_named_continuation(tmp_path: Path, run: str | None) -> None:
    """Fit 6 steps, save a checkpoint, resume to 10: the second run continues at step 6 under a
    name that says so, and both runs stay apart in the one recording."""
    torch.manual_seed(0)
    record, ckpt = tmp_path / "resume.stiff", tmp_path / "six.ckpt"
    options = {"endpoint": "", "record": str(record), "registry": False, "run": run}
    first = trainer(StiffmonCallback(**options), max_steps=6)
    first.fit(Classifier("logits"), data())
    first.save_checkpoint(ckpt)
    second = trainer(StiffmonCallback(**options), max_steps=10)
    second.fit(Classifier("logits"), data(), ckpt_path=str(ckpt))
    a, b = sorted(runs(record), key=lambda rd: rd.scalars["loss"].steps[0])
    base = run or "SGD lr=0.5"
    assert a.name == base and b.name == f"{base} (resumed at step 6)"
    assert a.scalars["loss"].steps.tolist() == list(range(6))
    assert b.scalars["loss"].steps.tolist() == list(range(6, 10))
    assert b.scalars["accuracy"].steps.tolist() == list(range(6, 10))
    assert a.finished and b.finished
