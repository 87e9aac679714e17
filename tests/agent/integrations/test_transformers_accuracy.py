"""The Hugging Face callback's accuracy over every micro-batch of an optimizer step, and its
measurements under ``bf16=True`` (the model's mixed-precision wrapper switched off)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from stiffmon.session import SessionReader
from stiffmon.store import RunData, Store

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip(
    "transformers", reason="needs transformers: pip install 'stiffmon[transformers]'"
)

from stiffmon_agent.integrations.transformers import (  # noqa: E402
    StiffmonCallback,
    accuracy_pair,
    split_labels,
)
from stiffmon_agent.metrics.state import measurement_mode  # noqa: E402
from tests.agent.integrations.test_transformers import TokenTask, tiny_bert  # noqa: E402
from tests.agent.integrations.test_transformers_lm import as_rows, lm_batch, tiny_gpt2  # noqa: E402


class HitsTrainer(transformers.Trainer):  # type: ignore[misc]
    """Counts, for each micro-batch, its hits and counted targets by hand from the model's
    logits (a no-grad forward before the Trainer's own): argmax against the labels, shifted for
    causal LMs, labels −100 left out."""

    def __init__(self, *args: object, causal: bool, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.causal = causal
        self.micro: list[tuple[int, int, int]] = []  # (global step, hits, counted)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        if model.training:
            with torch.no_grad():
                fwd = {k: v for k, v in inputs.items() if k != "labels"}
                logits, labels = model(**fwd).logits, inputs["labels"]
                if self.causal:
                    logits, labels = logits[:, :-1], labels[:, 1:]
                keep = labels != -100
                hits = int(((logits.argmax(-1) == labels) & keep).sum())
            self.micro.append((self.state.global_step, hits, int(keep.sum())))
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )


def args(tmp_path: Path, steps: int, acc: int, batch: int, **extra: object) -> object:
    return transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=acc,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **extra,
    )


def recorded(record: Path) -> RunData:
    store = Store()
    store.extend(SessionReader(record), replay=True)
    (rd,) = store.runs.values()
    return rd


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_accuracy_counts_every_micro_batch_of_the_step(tmp_path: Path, kind: str) -> None:
    """Accumulating 3 micro-batches: a classifier's accuracy per example, a causal LM's per
    next token (right padding labelled −100 not counted), over all three."""
    steps, acc = 3, 3
    if kind == "bert":
        model, rows, causal = tiny_bert(), list(TokenTask(64, seed=5)), False
    else:
        model, rows, causal = tiny_gpt2(), as_rows(lm_batch(64, seed=6, pad=True)), True
    record = tmp_path / f"{kind}.stiff"
    cb = StiffmonCallback(run=kind, endpoint="", record=str(record), registry=False)
    trainer = HitsTrainer(
        model=model,
        args=args(tmp_path, steps, acc, batch=4),
        train_dataset=rows,
        callbacks=[cb],
        causal=causal,
    )
    trainer.train()
    rd = recorded(record)
    accuracy = rd.scalars["accuracy"]
    assert accuracy.steps.tolist() == list(range(steps))
    differs = False
    for step, value in enumerate(accuracy.values.tolist()):
        parts = [(h, n) for s, h, n in trainer.micro if s == step]
        assert len(parts) == acc
        assert value == pytest.approx(sum(h for h, _ in parts) / sum(n for _, n in parts))
        differs |= value != pytest.approx(parts[-1][0] / parts[-1][1])
    assert differs  # the last micro-batch alone gives other values
    assert not [e for e in rd.events if e.code == "accuracy-off"]


def test_accuracy_pair_layouts() -> None:
    labels = torch.tensor([[5, 6, -100], [7, -100, -100]])
    logits = torch.randn(2, 3, 9)
    lg, tg = accuracy_pair(logits, labels, None, causal=True)  # type: ignore[misc]
    assert lg.shape == (2, 2, 9) and tg.tolist() == [[6, -100], [-100, -100]]
    lg, tg = accuracy_pair(logits, labels, None, causal=False)  # type: ignore[misc]
    assert lg is logits and tg is labels
    assert accuracy_pair(torch.randn(2, 1), torch.randn(2), None, causal=False) is None
    assert accuracy_pair(torch.randn(2, 3), torch.randn(2, 3), None, causal=False) is None


def test_bf16_training_measures_without_a_gram_fallback(tmp_path: Path) -> None:
    """``bf16=True``: accelerate wraps the model's forward in a bfloat16 autocast that the
    agent's measurement cannot switch off from outside; the callback measures through the
    model's own forward, in float32, so the fast per-example Gram needs no fallback."""
    train = TokenTask(64, seed=1)
    record = tmp_path / "bf16.stiff"
    cb = StiffmonCallback(
        probe=train.batch(12),
        run="bf16",
        endpoint="",
        record=str(record),
        gram_every=1,
        sharpness_every="never",
        overhead_cap=None,
        registry=False,
    )
    trainer = transformers.Trainer(
        model=tiny_bert(), args=args(tmp_path, 2, 1, batch=8, bf16=True), train_dataset=train,
        callbacks=[cb],
    )  # fmt: skip
    trainer.train()
    rd = recorded(record)
    assert len(rd.scalars["noise/trace_k"]) == 2
    assert not [e.message for e in rd.events if e.code == "gram-fallback"]
    assert not [e.message for e in rd.events if e.level in ("warning", "error")]


def test_measurement_forward_runs_outside_the_wrappers_autocast() -> None:
    accelerate = pytest.importorskip("accelerate")
    model = tiny_bert()
    accelerate.Accelerator(mixed_precision="bf16", cpu=True).prepare(model)
    seen: list[bool] = []
    model.classifier.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    inputs, _ = split_labels(TokenTask(4, seed=2).batch(4))
    wrapped = model.forward
    with measurement_mode(model):
        model(**inputs)
    model(**inputs)
    assert seen == [False, True]  # measured in float32; training keeps its autocast
    assert model.forward == wrapped


def test_the_model_can_be_deep_copied_while_the_callback_watches(tmp_path: Path) -> None:
    """The agent's float64 check of a Gram mismatch copies the model; the callback's forward
    hook (which holds the agent, with its threads and locks) must not stop that."""
    model = tiny_bert()
    cb = StiffmonCallback(endpoint="", record=str(tmp_path / "c.stiff"), registry=False)
    state = transformers.TrainerState()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cb.on_train_begin(args(tmp_path, 1, 1, batch=4), state, None, model=model, optimizer=opt)
    try:
        twin = copy.deepcopy(model)
        inputs = TokenTask(4, seed=3).batch(4)
        twin.train()
        twin(**inputs).loss.backward()  # the copy's training forward reports nothing
        assert not cb._loss._parts
    finally:
        cb.on_train_end(None, state, None)
