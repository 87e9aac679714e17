"""The Hugging Face callback: a ``Trainer`` run of a tiny random BERT classifier, offline."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stiffmon.session import SessionReader
from stiffmon.store import Store

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip(
    "transformers", reason="needs transformers: pip install 'stiffmon[transformers]'"
)

from stiffmon_agent.integrations.transformers import (  # noqa: E402
    ModelLoss,
    StiffmonCallback,
    logits_forward,
    split_labels,
)

ROOT = Path(__file__).resolve().parents[3]
SEQ, VOCAB, CLASSES = 12, 40, 3


class TokenTask(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Generated sequences; the label is which of the tokens 1, 2, 3 occurs most often."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, VOCAB, (n, SEQ), generator=g)
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)
        for i, c in enumerate(self.labels.tolist()):
            pos = torch.randperm(SEQ - 1, generator=g)[:4] + 1
            self.ids[i, pos] = c + 1
        self.ids[:, 0] = 0  # [CLS]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(SEQ, dtype=torch.long),
            "labels": self.labels[i],
        }

    def batch(self, n: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[:n],
            "attention_mask": torch.ones(n, SEQ, dtype=torch.long),
            "labels": self.labels[:n],
        }


class RecordingTrainer(transformers.Trainer):  # type: ignore[misc]
    """Keeps every micro-batch training loss, as the Trainer computes it (the reference)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.micro_losses: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):  # type: ignore[no-untyped-def]
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss = out[0] if return_outputs else out
        if model.training:
            self.micro_losses.append(float(loss.detach()))
        return out


def tiny_bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ,
        num_labels=CLASSES,
        id2label={0: "one", 1: "two", 2: "three"},
        label2id={"one": 0, "two": 1, "three": 2},
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        # the default attention implementation (SDPA): measurements select its math backend,
        # which has the double backward that sharpness needs
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


@pytest.mark.slow
def test_trainer_run_is_recorded_and_summarised(tmp_path: Path) -> None:
    steps, acc = 8, 2
    train, val = TokenTask(256, seed=1), TokenTask(64, seed=2)
    record = tmp_path / "bert.stiff"
    cb = StiffmonCallback(
        probe=train.batch(24),
        val_probe=val.batch(12),
        run="tiny bert",
        endpoint="",
        record=str(record),
        gram_every="every:3",
        sharpness_every="every:3",
        overhead_cap=None,
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=acc,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = RecordingTrainer(model=tiny_bert(), args=args, train_dataset=train, callbacks=[cb])
    trainer.train()
    assert cb.agent is None

    store = Store()
    store.extend(SessionReader(record), replay=True)
    (rd,) = store.runs.values()
    assert rd.name == "tiny bert" and rd.finished
    assert rd.batch_size == 16 * acc
    assert rd.hello is not None and rd.hello.class_names == ("one", "two", "three")
    loss = rd.scalars["loss"]
    assert loss.steps.tolist() == list(range(steps))  # one step per optimizer step
    # The mean of the step's micro-batch losses, as the Trainer computed them.
    micro = torch.tensor(trainer.micro_losses).reshape(steps, acc).mean(dim=1)
    assert loss.values.tolist() == pytest.approx(micro.tolist(), rel=1e-5)
    assert len(rd.scalars["accuracy"]) == steps

    out = subprocess.run(
        [sys.executable, "-m", "stiffmon", "summary", str(record), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    (row,) = json.loads(out.stdout)
    assert row["steps"] == steps
    assert row["optimizer"] == "AdamW"
    assert row["peak_lambda1_h"] is not None and row["peak_lambda1_h"] > 0
    assert row["within_minus_between"] is not None and math.isfinite(row["within_minus_between"])
    assert not [e for e in rd.events if e.level == "error"], [e.message for e in rd.events]


def test_model_loss_matches_the_models_own_loss_per_example() -> None:
    model = tiny_bert().eval()
    data = TokenTask(6, seed=3)
    inputs, labels = split_labels(data.batch(6))
    per_example = ModelLoss(model.config)(model(**inputs).logits, labels)
    for i in range(6):  # the model's own (mean-reduced) loss on each example alone
        one = model(**{k: v[i : i + 1] for k, v in inputs.items()}, labels=labels[i : i + 1])
        assert per_example[i].item() == pytest.approx(one.loss.item(), rel=1e-5)


def test_token_level_loss_ignores_padding_labels() -> None:
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, -100, 3], [4, -100, 5, 6, 0]])
    got = ModelLoss()(logits, labels)
    for i in range(2):
        keep = labels[i] != -100
        ref = torch.nn.functional.cross_entropy(logits[i][keep], labels[i][keep])
        assert got[i].item() == pytest.approx(ref.item(), rel=1e-12)
    causal = ModelLoss(causal=True)(logits, labels)
    keep = labels[0, 1:] != -100
    ref = torch.nn.functional.cross_entropy(logits[0, :-1][keep], labels[0, 1:][keep])
    assert causal[0].item() == pytest.approx(ref.item(), rel=1e-12)


def test_explicit_positions_change_nothing_and_avoid_vmap() -> None:
    from stiffmon_agent.metrics import per_example_gram

    model = tiny_bert().eval()
    inputs, labels = split_labels(TokenTask(6, seed=4).batch(6))
    inputs["attention_mask"][0, -3:] = 0  # padding: a data-dependent mask
    with torch.no_grad():
        torch.testing.assert_close(logits_forward(model, inputs), model(**inputs).logits)
    res = per_example_gram(model, inputs, labels, ModelLoss(model.config), forward=logits_forward)
    assert "vmap" not in res.methods.values()
    grads = []  # reference: one backward pass per example
    for i in range(6):
        model.zero_grad()
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        model(**one, labels=labels[i : i + 1]).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    g = torch.stack(grads).double()
    torch.testing.assert_close(res.total.double(), g @ g.T, rtol=1e-4, atol=1e-7)
