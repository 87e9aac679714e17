"""A step's accuracy: kept small logits counted in a few kernels, big ones counted at once."""

from __future__ import annotations

import gc
import math
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from stiffmon import protocol as p
from stiffmon.session import read_session
from stiffmon_agent import Agent
from stiffmon_agent import accuracy as acc_mod
from stiffmon_agent.accuracy import (
    DEFER_MAX_ELEMENTS,
    STACK_MAX_ELEMENTS,
    Accuracy,
    accuracies,
    binary_threshold,
    step_accuracy,
)


def _reference(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Hits over the targets that are not padding (negative), one prediction at a time."""
    hits = [
        int(a) == int(b)
        for a, b in zip(logits.argmax(-1).reshape(-1), targets.reshape(-1), strict=True)
        if int(b) >= 0
    ]
    return sum(hits) / len(hits) if hits else math.nan


def test_a_batch_of_accuracies_matches_a_loop_and_never_stacks_past_the_grain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kept and counted steps, shapes changing between runs, the last batch smaller: every
    value equals the per-step loop, and no kernel sees more than the parallel grain."""
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 10)] * 120 + [(17, 10)] * 3 + [(8, 4, 5)] * 4 + [(64, 200)] * 3 + [(64, 10)] * 5
    steps = []
    for shape in shapes:
        logits = torch.randn(*shape, generator=g)
        targets = torch.randint(0, shape[-1], shape[:-1], generator=g)
        steps.append((logits, targets))
    column = [Accuracy.of(lg, t) for lg, t in steps]
    assert [a.hits is None for a in column] == [
        lg.numel() <= DEFER_MAX_ELEMENTS for lg, _ in steps
    ]  # the 64 x 200 logits (12,800 elements) were counted on the training thread
    stacked: list[int] = []
    real_stack = torch.stack

    def spy(tensors: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = real_stack(tensors, *args, **kwargs)
        stacked.append(out.numel())
        return out

    real_np_stack = np.stack

    def np_spy(arrays: Any, *args: Any, **kwargs: Any) -> Any:
        out = real_np_stack(arrays, *args, **kwargs)
        stacked.append(out.size)
        return out

    monkeypatch.setattr(acc_mod.torch, "stack", spy)
    monkeypatch.setattr(acc_mod.np, "stack", np_spy)
    got = accuracies(column)
    np.testing.assert_allclose(got, [_reference(lg, t) for lg, t in steps], rtol=0, atol=1e-15)
    assert max(stacked) <= STACK_MAX_ELEMENTS <= 32_768 and len(stacked) < 20  # torch's grain


def test_big_logits_are_counted_at_once_and_not_kept() -> None:
    logits = torch.randn(4, DEFER_MAX_ELEMENTS)  # 4 x 8192: over the limit
    targets = torch.tensor([0, 1, 2, 3])
    alive = weakref.ref(logits)
    a = Accuracy.of(logits, targets)
    assert a.logits is None and a.hits is not None and a.hits.tolist()[1] == 4
    expected = _reference(logits, targets)
    del logits
    gc.collect()
    assert alive() is None and float(a) == expected


def test_targets_changed_in_place_before_counting_give_nan_not_a_wrong_number() -> None:
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    buffer = torch.tensor([1, 0])
    kept = Accuracy.of(logits, buffer)
    buffer.copy_(torch.tensor([0, 1]))  # a reused target buffer, refilled for the next step
    fresh = Accuracy.of(logits, buffer)
    assert math.isnan(float(kept)) and float(fresh) == 0.0
    np.testing.assert_array_equal(accuracies([kept, fresh]), [math.nan, 0.0])


def test_logits_and_targets_that_do_not_compare_are_nan_and_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Mismatched shapes (no broadcasting: (B, 1) targets against (B, C) logits would compare
    every prediction with every target) are NaN in the recording, with one warning event and
    one log line per reason; the steps around them keep their accuracy."""
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = tmp_path / "acc.stiff"
    agent = Agent(model, torch.nn.CrossEntropyLoss(), opt, endpoint="", record=rec, registry=False)
    good = (torch.tensor([[0.0, 1.0, 0.0]] * 4), torch.tensor([1, 1, 0, 1]))  # 3 of 4
    steps = [good, (torch.randn(4, 3), torch.zeros(5, dtype=torch.long))] * 2
    steps += [(torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long)), good]
    steps += [(torch.randn(4, DEFER_MAX_ELEMENTS), torch.zeros(5, dtype=torch.long))]  # counted
    binary = (torch.tensor([2.0, -1.0, 3.0, 1.0]), torch.tensor([1.0, 0.0, 1.0, 1.0]))
    steps += [binary, (binary[0][:, None], binary[1][:, None]), good]  # BCE logits: no argmax
    with caplog.at_level("WARNING", logger="stiffmon_agent"):
        for logits, targets in steps:
            agent.step(torch.tensor(0.5), logits, targets)
        agent.close()
    msgs = read_session(rec)[0]
    got = np.concatenate([m.column("accuracy") for m in msgs if isinstance(m, p.Columns)])
    nan = math.nan
    np.testing.assert_array_equal(got, [0.75, nan, 0.75, nan, nan, 0.75, nan, nan, nan, 0.75])
    events = [m.message for m in msgs if isinstance(m, p.Event)]
    assert all(m.code == "accuracy-unavailable" for m in msgs if isinstance(m, p.Event))
    # (4,)/(5,), (4, 1) targets, (4,) and (4, 1) binary logits; the counted step's (4, 8192)
    # logits against (5,) targets are refused at once, and said by the agent itself
    assert len(events) == 5
    assert sum("do not compare" in e for e in events) == 3
    assert any(e.startswith("no accuracy at step 6 (NaN)") and "(4, 8192)" in e for e in events)
    assert any("(4, 3)" in e and "(4, 1)" in e for e in events)
    assert sum("no class dimension" in e or "same shape (4,)" in e for e in events) == 2
    said = [r.message for r in caplog.records if "accuracy" in r.message]
    assert len(said) == 5  # the four above, and the counted step's, said on the training thread
    assert math.isnan(step_accuracy(torch.randn(9000, 3), torch.zeros(3), set()))  # type: ignore[arg-type]


def test_bfloat16_logits_are_counted_in_torch() -> None:
    """numpy has no bfloat16: those steps take the torch path and still match the loop."""
    g = torch.Generator().manual_seed(1)
    steps = [
        (torch.randn(32, 7, generator=g).bfloat16(), torch.randint(0, 7, (32,), generator=g))
        for _ in range(5)
    ]
    got = accuracies([Accuracy.of(lg, t) for lg, t in steps])
    np.testing.assert_allclose(got, [_reference(lg, t) for lg, t in steps], rtol=0, atol=1e-15)


@pytest.mark.parametrize("counted", [False, True])
def test_padding_targets_are_not_predictions(counted: bool) -> None:
    """Per-token logits (B, T, V) with ``ignore_index`` padding (-100): hits over the real
    tokens only, kept or counted on the training thread; a step of padding alone is NaN."""
    g = torch.Generator().manual_seed(3)
    vocab = DEFER_MAX_ELEMENTS if counted else 7
    steps = []
    for pad in (0, 3, 6, 8):  # padded tokens at the end of each of the 2 sequences of 8
        logits = torch.randn(2, 8, vocab, generator=g)
        targets = logits.argmax(-1)  # every real token predicted right ...
        targets[0, :2] = (targets[0, :2] + 1) % vocab  # ... but two
        targets[:, 8 - pad :] = -100
        steps.append((logits, targets))
    column = [Accuracy.of(lg, t) for lg, t in steps]
    assert all((a.hits is not None) == counted for a in column)
    got = accuracies(column)
    expected = [_reference(lg, t) for lg, t in steps]
    assert math.isnan(expected[-1]) and expected[1] == (10 - 2) / 10
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)
    assert [float(a) for a in column[:3]] == expected[:3]


@pytest.mark.parametrize("counted", [False, True])
@pytest.mark.parametrize("loss", ["logits", "probabilities"])
def test_a_binary_loss_gets_the_thresholded_accuracy(counted: bool, loss: str) -> None:
    """BCEWithLogitsLoss (threshold 0) and BCELoss (0.5): the fraction of outputs on the side of
    their 0/1 target, one element at a time, for (B,), (B, 1) and multi-label (B, C) outputs;
    targets of another shape are NaN with a reason."""
    fn = torch.nn.BCEWithLogitsLoss() if loss == "logits" else torch.nn.BCELoss()
    t = binary_threshold(fn)
    assert t == (0.0 if loss == "logits" else 0.5)
    assert binary_threshold(torch.nn.CrossEntropyLoss()) is None
    g = torch.Generator().manual_seed(5)
    big = DEFER_MAX_ELEMENTS + 1 if counted else 3
    for shape in ((16,), (16, 1), (4, big)):
        outs = torch.randn(*shape, generator=g)
        outs = outs if loss == "logits" else torch.sigmoid(outs)
        targets = (torch.rand(*shape, generator=g) > 0.5).float()
        ref = (
            sum(
                (float(o) > t) == (float(y) == 1.0)
                for o, y in zip(outs.reshape(-1), targets.reshape(-1), strict=True)
            )
            / targets.numel()
        )
        a = Accuracy.of(outs, targets, t)
        assert (a.hits is not None) == (counted and shape[-1] == big)
        assert float(a) == pytest.approx(ref, abs=1e-15)
        np.testing.assert_allclose(accuracies([a, a]), [ref, ref], rtol=0, atol=1e-15)
    problems: set[str] = set()
    bad = Accuracy.of(torch.randn(16, 1), torch.ones(16), t)
    assert math.isnan(accuracies([bad], problems=problems)[0])
    assert any("binary loss do not compare" in x for x in problems)


def test_an_agent_with_a_bce_loss_publishes_the_binary_accuracy(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = tmp_path / "bce.stiff"
    agent = Agent(model, torch.nn.BCEWithLogitsLoss(), opt, endpoint="", record=rec, registry=False)
    logits = torch.tensor([[2.0], [-1.0], [3.0], [-0.5]])
    agent.step(torch.tensor(0.5), logits, torch.tensor([[1.0], [0.0], [0.0], [1.0]]))
    agent.close()
    msgs = read_session(rec)[0]
    got = np.concatenate([m.column("accuracy") for m in msgs if isinstance(m, p.Columns)])
    np.testing.assert_array_equal(got, [0.5])
    assert not [m for m in msgs if isinstance(m, p.Event) and m.code == "accuracy-unavailable"]


def test_a_run_without_logits_says_once_that_it_has_no_accuracy(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for given in (False, True):
        rec = tmp_path / f"off-{given}.stiff"
        agent = Agent(
            model, torch.nn.CrossEntropyLoss(), opt, endpoint="", record=rec, registry=False
        )
        for _ in range(3):
            pair = (torch.randn(4, 3), torch.tensor([0, 1, 2, 0])) if given else ()
            agent.step(torch.tensor(0.5), *pair)
        agent.close()
        events = [m for m in read_session(rec)[0] if isinstance(m, p.Event)]
        said = [e for e in events if e.code == "accuracy-off"]
        if given:
            assert not said
            continue
        assert len(said) == 1 and said[0].level == "info" and said[0].step == 0
        assert said[0].message == (
            "no accuracy: step() gets no logits/targets (pass logits=, targets= for it)"
        )
