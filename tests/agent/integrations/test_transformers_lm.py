"""The Hugging Face callback on language models: causal-LM detection, and the step's loss under
gradient accumulation (transformers passes the step's token count to models that take it)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from stiffmon.session import SessionReader
from stiffmon.store import Store

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip(
    "transformers", reason="needs transformers: pip install 'stiffmon[transformers]'"
)

from stiffmon_agent.integrations.transformers import (  # noqa: E402
    StiffmonCallback,
    detect_causal_lm,
    is_causal_lm,
    logits_forward,
    split_labels,
)

SEQ, VOCAB = 10, 50


def tiny_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def tiny_bert_config(**extra: object) -> object:
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **extra,
    )


def lm_batch(n: int, seed: int, pad: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = ids.clone()
    mask = torch.ones(n, SEQ, dtype=torch.long)
    if pad:  # right padding of varied length: examples with different token counts
        lens = torch.randint(3, SEQ + 1, (n,), generator=g)
        mask = (torch.arange(SEQ)[None] < lens[:, None]).long()
        labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def shifted_reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example: mean over t with labels[t + 1] != -100 of CE(logits[t], labels[t + 1])."""
    lg, lab = logits[:, :-1].double(), labels[:, 1:]
    out = []
    for i in range(lg.shape[0]):
        keep = lab[i] != -100
        out.append(F.cross_entropy(lg[i][keep], lab[i][keep], reduction="mean"))
    return torch.stack(out)


def test_causal_lm_detection() -> None:
    assert detect_causal_lm(tiny_gpt2()) is True  # GPT2LMHeadModel: not "...ForCausalLM"
    assert detect_causal_lm(tiny_llama()) is True
    assert detect_causal_lm(torch.compile(tiny_gpt2())) is True  # looked through
    bert = tiny_bert_config()
    assert detect_causal_lm(transformers.BertForMaskedLM(bert)) is False
    assert detect_causal_lm(transformers.BertForSequenceClassification(bert)) is False
    decoder = tiny_bert_config(is_decoder=True)
    assert detect_causal_lm(transformers.BertLMHeadModel(decoder)) is True
    t5 = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2
    )
    assert detect_causal_lm(transformers.T5ForConditionalGeneration(t5)) is False
    assert detect_causal_lm(torch.nn.Linear(3, 3)) is None  # unknown: says so
    assert is_causal_lm(torch.nn.Linear(3, 3)) is False


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_callback_loss_is_shifted_for_causal_lms(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = make()
    batch = lm_batch(6, seed=1, pad=True)
    cb = StiffmonCallback(
        probe=batch,
        run="lm",
        endpoint="",
        record=str(tmp_path / "lm.stiff"),
        gram_every="never",
        sharpness_every="never",
    )
    args = SimpleNamespace(per_device_train_batch_size=6, gradient_accumulation_steps=1)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cb.on_train_begin(args, state, None, model=model, optimizer=optimizer)  # type: ignore[arg-type]
    try:
        assert cb.agent is not None
        inputs, labels = split_labels(batch)
        model.eval()
        with torch.no_grad():
            logits = logits_forward(model, inputs)
            got = cb.agent.loss_fn(logits, labels)
            ref = shifted_reference(model(**inputs).logits, labels)
            # and the model's own (token-mean) loss on each example alone
            own = [
                model(**{k: v[i : i + 1] for k, v in batch.items()}).loss.item() for i in range(6)
            ]
            whole = model(**batch).loss.item()  # divides by the batch's token count
        # each example's token sum over the probe's mean count c̄ (the examples' counts differ)
        counts = (labels[:, 1:] != -100).sum(dim=1).double()
        assert len(set(counts.tolist())) > 1
        cbar = counts.mean()
        torch.testing.assert_close(got.double(), ref * counts / cbar, rtol=1e-5, atol=1e-6)
        assert (got.double() * cbar / counts).tolist() == pytest.approx(own, rel=1e-5)
        assert got.mean().item() == pytest.approx(whole, rel=1e-5)  # the probe's objective
    finally:
        cb.on_train_end(args, state, None)
    store = Store()
    store.extend(SessionReader(tmp_path / "lm.stiff"), replay=True)
    (rd,) = store.runs.values()
    (event,) = [e for e in rd.events if e.code == "token-weighted"]
    assert event.attrs["cbar"] == pytest.approx(float(cbar))
    assert (event.attrs["low"], event.attrs["high"]) == (counts.min(), counts.max())


def test_model_loss_token_count_over_labels() -> None:
    """ModelLoss.count_over: c̄ over the examples with a counted label (shifted for causal
    LMs), nothing set where every example counts alike or the labels are not tokens; the probe
    mean of the losses is then the model's loss: Σ ℓ over the batch's counted tokens / count."""
    from stiffmon_agent.integrations.transformers import ModelLoss

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (4, 6), generator=g)
    assert ModelLoss(causal=True).count_over(labels) is None  # all count alike
    assert ModelLoss().count_over(torch.randint(0, 7, (4,))) is None
    labels[0, 3:] = -100
    labels[1, 1:] = -100  # counts the first label only: 0 positions once shifted
    labels[2, :] = -100  # no label at all: left out of the probe by the agent, and of c̄
    for causal in (False, True):
        loss = ModelLoss(causal=causal)
        w = loss.count_over(labels)
        assert w is not None
        lab = labels[:, 1:] if causal else labels
        lg = logits[:, :-1] if causal else logits
        kept = [0, 1, 3]
        counts = (lab[kept] != -100).sum(dim=1).double()
        assert w.mean == pytest.approx(float(counts.mean()))
        got = loss(logits[kept], labels[kept])
        keep = lab[kept] != -100
        whole = F.cross_entropy(lg[kept][keep], lab[kept][keep], reduction="mean")
        assert got.mean().item() == pytest.approx(whole.item(), rel=1e-12)


class OwnLossTrainer(transformers.Trainer):  # type: ignore[misc]
    """Keeps, for each micro-batch, the sum and count of its loss terms, computed by hand in
    float64 from the model's logits (shifted for causal LMs) before the Trainer's own pass."""

    def __init__(self, *args: object, causal: bool, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.causal = causal
        self.micro: list[tuple[int, float, int]] = []  # (global step, loss sum, count)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        if model.training:
            with torch.no_grad():
                fwd = {k: v for k, v in inputs.items() if k != "labels"}
                logits, labels = model(**fwd).logits.double(), inputs["labels"]
                if self.causal:
                    logits, labels = logits[:, :-1], labels[:, 1:]
                keep = labels != -100
                total = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
            self.micro.append((self.state.global_step, total.item(), int(keep.sum())))
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )


def recorded_loss(record: Path) -> list[float]:
    store = Store()
    store.extend(SessionReader(record), replay=True)
    (rd,) = store.runs.values()
    assert not [e for e in rd.events if e.level in ("warning", "error")], [
        e.message for e in rd.events
    ]
    return rd.scalars["loss"].values.tolist()


def run_trainer(model, data, acc: int, tmp_path: Path, causal: bool, tag: str):  # type: ignore[no-untyped-def]
    steps = 3
    record = tmp_path / f"{tag}.stiff"
    cb = StiffmonCallback(
        probe={k: v[:4] for k, v in data[0].items()} if isinstance(data[0], dict) else None,
        run=tag,
        endpoint="",
        record=str(record),
        gram_every="never",
        sharpness_every="never",
        overhead_cap=None,
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=acc,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = OwnLossTrainer(
        model=model, args=args, train_dataset=data[1], callbacks=[cb], causal=causal
    )
    trainer.train()
    got = recorded_loss(record)
    assert len(got) == steps
    return got, trainer.micro


def as_rows(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    n = batch["input_ids"].shape[0]
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


@pytest.mark.parametrize(
    ("make", "acc", "pad"),
    [(tiny_llama, 1, False), (tiny_llama, 2, False), (tiny_llama, 4, True), (tiny_gpt2, 2, True)],
)
def test_step_loss_is_the_models_mean_over_the_step(make, acc, pad, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    batch = lm_batch(64, seed=2, pad=pad)
    got, micro = run_trainer(
        make(), (batch, as_rows(batch)), acc, tmp_path, causal=True, tag=f"{make.__name__}{acc}"
    )
    for step, value in enumerate(got):
        parts = [(s, n) for gs, s, n in micro if gs == step]
        assert len(parts) == acc
        # the token mean over the step's micro-batches (= the mean of the micro-batch means
        # when they hold as many tokens); not ÷ acc, and not HF's count of unshifted labels
        ref = sum(s for s, _ in parts) / sum(n for _, n in parts)
        assert value == pytest.approx(ref, rel=1e-5)


def test_step_loss_of_a_classifier_that_ignores_the_token_count(tmp_path: Path) -> None:
    # BertForSequenceClassification takes **kwargs (so the Trainer passes num_items_in_batch)
    # but its loss is a plain mean: the step's loss is the mean of the micro-batch means.
    g = torch.Generator().manual_seed(3)
    batch = {
        "input_ids": torch.randint(0, VOCAB, (64, SEQ), generator=g),
        "attention_mask": torch.ones(64, SEQ, dtype=torch.long),
        "labels": torch.randint(0, 3, (64,), generator=g),
    }
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(tiny_bert_config(num_labels=3))
    got, micro = run_trainer(model, (batch, as_rows(batch)), 2, tmp_path, causal=False, tag="bert")
    for step, value in enumerate(got):
        parts = [s / n for gs, s, n in micro if gs == step]
        assert len(parts) == 2
        assert value == pytest.approx(sum(parts) / 2, rel=1e-5)
