"""The accuracy's layouts (classes last, or in dimension 1 as for segmentation), a non-negative
``ignore_index``, and the wording of the warning when there is no accuracy."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stiffmon import protocol as p
from stiffmon.session import read_session
from stiffmon_agent import Agent
from stiffmon_agent.accuracy import (
    DEFER_MAX_ELEMENTS,
    Accuracy,
    accuracies,
    class_ignore_index,
    step_accuracy,
)
from stiffmon_agent.accuracy_reasons import check_comparable


def _reference(
    logits: torch.Tensor, targets: torch.Tensor, dim: int, ignore: int | None = None
) -> float:
    """Hits over the targets that count (≥ 0, not ``ignore``), one prediction at a time: the
    classes of each target's prediction are read off dimension ``dim`` by hand."""
    hits = n = 0
    moved = logits.movedim(dim, -1)  # (..., C), one row of class scores per target
    rows = moved.reshape(-1, moved.shape[-1]).tolist()
    for scores, target in zip(rows, targets.reshape(-1).tolist(), strict=True):
        if target < 0 or target == ignore:
            continue
        best = max(range(len(scores)), key=lambda c: (scores[c], -c))  # first of the largest
        hits += best == target
        n += 1
    return hits / n if n else math.nan


def _steps(
    shape: tuple[int, ...], dim: int, count: int, seed: int, pad: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` steps of random logits of ``shape`` with targets of classes in ``dim``, about
    half of them right, a few of them padding (-100)."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(count):
        logits = torch.randn(*shape, generator=g)
        targets = logits.argmax(dim)
        wrong = torch.rand(targets.shape, generator=g) < 0.5
        targets = torch.where(wrong, (targets + 1) % shape[dim], targets)
        if pad:
            targets = torch.where(torch.rand(targets.shape, generator=g) < 0.1, -100, targets)
        steps.append((logits, targets))
    return steps


@pytest.mark.parametrize(
    "shape",
    [(2, 5, 8, 8), (3, 4, 7), (2, 21, 16, 16), (2, 3, 2, 2, 1000)],
    ids=["BCHW-kept", "NCL-kept", "BCHW-counted", "BCDHW-counted"],
)
def test_classes_in_dimension_1_as_cross_entropy_reads_segmentation_logits(
    shape: tuple[int, ...],
) -> None:
    """(N, C, d1, ...) logits with (N, d1, ...) targets: the argmax over dimension 1, kept and
    stacked on the publisher thread or counted at once, equal to the per-pixel loop."""
    assert check_comparable(torch.empty(shape), torch.empty(shape[:1] + shape[2:])) == 1
    steps = _steps(shape, 1, 5, seed=sum(shape))
    column = [Accuracy.of(lg, t) for lg, t in steps]
    counted = math.prod(shape) > DEFER_MAX_ELEMENTS
    assert all((a.hits is not None) == counted for a in column)
    expected = [_reference(lg, t, 1) for lg, t in steps]
    assert all(0.2 < e < 0.8 for e in expected)  # neither all right nor all wrong
    np.testing.assert_allclose(accuracies(column), expected, rtol=0, atol=1e-12)
    assert [float(a) for a in column] == pytest.approx(expected, abs=1e-12)


def test_a_shape_that_fits_both_layouts_is_read_classes_last() -> None:
    """(N, T, T) logits with (N, T) targets fit both readings: classes last, as before."""
    steps = _steps((4, 6, 6), -1, 6, seed=7)
    assert check_comparable(*steps[0]) == -1
    expected = [_reference(lg, t, -1) for lg, t in steps]
    assert expected != pytest.approx([_reference(lg, t, 1) for lg, t in steps])
    np.testing.assert_allclose(
        accuracies([Accuracy.of(lg, t) for lg, t in steps]), expected, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize(
    ("logits", "targets", "says"),
    [
        ((4, 1), (4, 1), "no class dimension"),  # a regression's outputs
        ((4, 3), (4, 3), "same shape"),  # probability (soft) targets
        ((2, 3, 5, 5), (2, 3, 5, 5), "same shape"),  # one-hot segmentation targets
        ((2, 1, 5, 5), (2, 5, 5), "no class dimension"),  # one logit per pixel
        ((2, 3, 5, 5), (2, 5, 4), "do not compare"),
        ((2, 3, 5, 5), (3, 5, 5), "do not compare"),
    ],
)
def test_shapes_without_an_argmax_accuracy_say_why(
    logits: tuple[int, ...], targets: tuple[int, ...], says: str
) -> None:
    with pytest.raises(ValueError, match=says):
        check_comparable(torch.empty(logits), torch.empty(targets))
    problems: set[str] = set()
    got = accuracies([Accuracy.of(torch.randn(logits), torch.zeros(targets))], problems=problems)
    assert math.isnan(got[0]) and any(says in x for x in problems)


@pytest.mark.parametrize("shape", [(2, 256, 4, 4), (2, 256, 5, 5)], ids=["kept", "counted"])
def test_segmentation_with_ignore_index_255(shape: tuple[int, ...]) -> None:
    """Targets 255 (a segmentation set's ``ignore_index``), some of them where the argmax is
    class 255: a class like any other unless ``ignore_index`` is passed, then left out like
    the negative ones."""
    assert class_ignore_index(torch.nn.CrossEntropyLoss(ignore_index=255)) == 255
    assert class_ignore_index(torch.nn.NLLLoss(ignore_index=255)) == 255
    assert class_ignore_index(torch.nn.CrossEntropyLoss()) is None  # -100: negative anyway
    assert class_ignore_index(torch.nn.MSELoss()) is None
    steps = _steps(shape, 1, 4, seed=11)
    g = torch.Generator().manual_seed(12)
    for logits, targets in steps:
        border = torch.rand(targets.shape, generator=g) < 0.3
        logits[:, 255][border] = 100.0  # the argmax is class 255 there: a hit unless ignored
        targets[border] = 255
        targets[torch.rand(targets.shape, generator=g) < 0.2] = 255  # mostly misses
    for ignore in (None, 255):
        column = [Accuracy.of(lg, t, None, ignore) for lg, t in steps]
        assert all((a.hits is not None) == (shape[-1] == 5) for a in column)
        expected = [_reference(lg, t, 1, ignore) for lg, t in steps]
        np.testing.assert_allclose(accuracies(column), expected, rtol=0, atol=1e-12)
        assert [float(a) for a in column] == pytest.approx(expected, abs=1e-12)
    with_255 = [_reference(lg, t, 1) for lg, t in steps]
    assert with_255 != pytest.approx([_reference(lg, t, 1, 255) for lg, t in steps])


def _run(
    tmp_path: Path,
    loss_fn: torch.nn.Module,
    steps: list[tuple[torch.Tensor, torch.Tensor] | None],
    caplog: pytest.LogCaptureFixture,
) -> tuple[list[float], list[str], list[str]]:
    """Record ``steps`` (None: a step without logits, which ends the batch): the accuracy
    column, the accuracy-unavailable events' messages and the log lines about the accuracy."""
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = tmp_path / "acc.stiff"
    agent = Agent(model, loss_fn, opt, endpoint="", record=rec, registry=False)
    with caplog.at_level("WARNING", logger="stiffmon_agent"):
        for step in steps:
            if step is None:
                agent.step(torch.tensor(0.5))
            else:
                agent.step(torch.tensor(0.5), *step)
        agent.close()
    msgs = read_session(rec)[0]
    cols = [m for m in msgs if isinstance(m, p.Columns) and "accuracy" in m.names]
    got = np.concatenate([m.column("accuracy") for m in cols]).tolist()
    events = [
        m.message for m in msgs if isinstance(m, p.Event) and m.code == "accuracy-unavailable"
    ]
    said = [r.message for r in caplog.records if "accuracy" in r.message]
    return got, events, said


@pytest.mark.parametrize(
    ("loss_fn", "logits", "targets"),
    [
        (torch.nn.MSELoss(), torch.randn(8, 1), torch.randn(8, 1)),  # a regression
        (torch.nn.CrossEntropyLoss(), torch.randn(8, 3), torch.softmax(torch.randn(8, 3), 1)),
        (torch.nn.CrossEntropyLoss(), torch.randn(2, 3, 4, 4), torch.rand(2, 3, 4, 4)),
    ],
    ids=["regression", "soft-targets", "one-hot-segmentation"],
)
def test_an_accuracy_never_available_is_said_unavailable_for_the_run(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    loss_fn: torch.nn.Module,
    logits: torch.Tensor,
    targets: torch.Tensor,
) -> None:
    got, events, said = _run(tmp_path, loss_fn, [(logits, targets)] * 6, caplog)
    assert len(got) == 6 and all(math.isnan(x) for x in got)
    assert len(events) == 1 and len(said) == 1  # once, not at every step or batch
    assert "unavailable for this run" in events[0] and "some steps" not in events[0]
    assert "unavailable for this run (NaN from the first step on)" in said[0]
    assert "some steps" not in said[0]


def test_segmentation_logits_get_an_accuracy_and_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """(B, C, H, W) logits with (B, H, W) targets, as ``CrossEntropyLoss`` takes them."""
    steps = _steps((2, 3, 4, 4), 1, 6, seed=3)
    got, events, said = _run(tmp_path, torch.nn.CrossEntropyLoss(), list(steps), caplog)
    np.testing.assert_allclose(got, [_reference(lg, t, 1) for lg, t in steps], atol=1e-12)
    assert not events and not said


def test_the_agent_leaves_out_its_cross_entropy_ignore_index(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``CrossEntropyLoss(ignore_index=255)``: the agent leaves targets 255 out of the accuracy,
    also where the argmax is class 255."""
    g = torch.Generator().manual_seed(5)
    steps = []
    for _ in range(4):
        logits = torch.randn(2, 256, 3, 3, generator=g)
        targets = torch.randint(0, 4, (2, 3, 3), generator=g)
        targets[0, 0] = 255
        logits[0, 255, 0] = 10.0  # argmax 255 where the target is ignored
        steps.append((logits, targets))
    got, events, _ = _run(tmp_path, torch.nn.CrossEntropyLoss(ignore_index=255), steps, caplog)
    ref = [_reference(lg, t, 1, ignore=255) for lg, t in steps]
    np.testing.assert_allclose(got, ref, atol=1e-12)
    assert ref != [_reference(lg, t, 1) for lg, t in steps] and not events


def test_an_accuracy_lost_after_some_steps_is_said_nan_at_some_steps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Good steps in one batch, then (after a step without logits, which ends it) steps whose
    shapes do not compare: NaN at some steps, not unavailable for the run."""
    good = (torch.tensor([[0.0, 1.0, 0.0]] * 4), torch.tensor([1, 1, 0, 1]))  # 3 of 4
    bad = (torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    got, events, said = _run(
        tmp_path, torch.nn.CrossEntropyLoss(), [good, good, None, bad, bad, good], caplog
    )
    np.testing.assert_array_equal(got, [0.75, 0.75, math.nan, math.nan, 0.75])
    assert len(events) == 1 and len(said) == 1
    assert "at some steps" in events[0] and "unavailable for this run" not in events[0]
    assert "no accuracy for some steps" in said[0]


def test_counted_steps_say_the_same_on_the_training_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Logits counted on the training thread (a GPU's, big ones): the one log line says the
    accuracy is unavailable for the run if no step was counted before, else NaN at some steps;
    it never raises."""
    big = DEFER_MAX_ELEMENTS + 1
    regression = (torch.randn(big, 1), torch.randn(big, 1))
    good = (torch.randn(4, big), torch.zeros(4, dtype=torch.long))
    with caplog.at_level("WARNING", logger="stiffmon_agent"):
        never: set[str] = set()
        assert math.isnan(step_accuracy(*regression, never))  # type: ignore[arg-type]
        assert math.isnan(step_accuracy(*regression, never))  # type: ignore[arg-type]
        before: set[str] = set()
        assert isinstance(step_accuracy(*good, before), Accuracy)
        assert math.isnan(step_accuracy(*regression, before))  # type: ignore[arg-type]
        assert math.isnan(step_accuracy(object(), object(), set()))  # type: ignore[arg-type]
    said = [r.message for r in caplog.records]
    assert len(said) == 3
    assert "unavailable for this run (NaN from the first step on)" in said[0]
    assert "no accuracy for some steps (NaN)" in said[1]
    assert "unavailable for this run" in said[2]  # not even a tensor
    assert not {"accuracy", ""} & (never | before)  # no custom scalar's name taken


def test_a_plain_callables_declared_ignore_index_is_left_out_of_the_accuracy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The ignore index the measurements take for a plain callable (its attribute, a partial's
    keyword) is the accuracy's too: the recorded accuracy leaves those pixels out."""
    ce = torch.nn.functional.cross_entropy
    declared = functools.partial(ce, ignore_index=255, reduction="none")
    assert class_ignore_index(declared) == 255
    tagged = lambda o, t: ce(o, t, ignore_index=7, reduction="none")  # noqa: E731
    tagged.ignore_index = 7  # type: ignore[attr-defined]
    assert class_ignore_index(tagged) == 7
    assert class_ignore_index(lambda o, t: ce(o, t, reduction="none")) is None  # -100
    g = torch.Generator().manual_seed(3)
    logits, targets = torch.randn(2, 3, 4, 4, generator=g), torch.randint(0, 3, (2, 4, 4))
    targets[:, 0] = 255  # a border row, where class 0 wins: hits if it counted as a class
    logits[:, 0, 0] = 9.0
    got, events, _ = _run(tmp_path, declared, [(logits, targets)], caplog)  # type: ignore[arg-type]
    kept = targets != 255
    want = float((logits.argmax(1)[kept] == targets[kept]).double().mean())
    assert got == pytest.approx([want], abs=1e-12) and events == []
