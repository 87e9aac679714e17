"""Why a step has no accuracy, in words a user can act on: never a raw Python exception (a
tuple of CTC targets once said ``'tuple' object has no attribute 'requires_grad'``), and the
``accuracy-unavailable`` event's wording for the first step and for a run of steps."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from stiffmon_agent.accuracy import (
    DEFER_MAX_ELEMENTS,
    Accuracy,
    accuracies,
    step_accuracy,
)
from stiffmon_agent.accuracy_reasons import (
    check_comparable,
    nan_accuracy_console,
    nan_accuracy_event,
    not_one_tensor,
)
from tests.agent.test_accuracy_layouts import _run

LOGITS = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
TARGETS = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(2))
CTC = (TARGETS.reshape(4, 2), torch.full((4,), 8), torch.full((4,), 2))  # (targets, lengths…)
RAW = ("object has no attribute", "NoneType", "Traceback")  # a Python exception's words


@pytest.mark.parametrize(
    ("logits", "targets", "says"),
    [
        (
            LOGITS,
            CTC,
            "the targets are a tuple of 3 tensors, not one class-index tensor per prediction: "
            "pass targets= the class indices, or leave logits/targets out",
        ),
        (LOGITS, [TARGETS, TARGETS], "the targets are a list of 2 tensors, not one class-index"),
        (
            LOGITS,
            {"labels": TARGETS, "mask": TARGETS},
            "the targets are a dict with keys 'labels', 'mask', not one class-index tensor per "
            "prediction: pass its 'labels' entry as targets=",
        ),
        (LOGITS, {"ids": TARGETS}, "the targets are a dict with keys 'ids', not one class-index"),
        (LOGITS, None, "no targets were given (targets=None): pass the class indices as targets="),
        (None, TARGETS, "no logits were given (logits=None): pass the class scores as logits="),
        (LOGITS, 3.0, "the targets are a float, not one class-index tensor per prediction"),
        (
            LOGITS,
            TARGETS.numpy(),
            "the targets are a numpy array (8,), not a torch tensor: pass torch.as_tensor(targets)",
        ),
        (
            LOGITS.numpy(),
            TARGETS,
            "the logits are a numpy array (8, 4), not a torch tensor: pass torch.as_tensor(logits)",
        ),
        (
            (LOGITS, LOGITS),
            TARGETS,
            "the logits are a tuple of 2 tensors, not one tensor of class scores: pass logits= "
            "the class scores, or leave logits/targets out",
        ),
        (
            {"loss": LOGITS.sum(), "logits": LOGITS},
            TARGETS,
            "the logits are a dict with keys 'loss', 'logits', not one tensor of class scores: "
            "pass its 'logits' entry as logits=",
        ),
    ],
    ids=[
        "ctc-tuple",
        "list",
        "batch-dict",
        "dict-unknown-key",
        "no-targets",
        "no-logits",
        "number",
        "numpy-targets",
        "numpy-logits",
        "tuple-logits",
        "output-dict",
    ],
)
def test_what_is_not_one_tensor_is_said_in_words(
    caplog: pytest.LogCaptureFixture, logits: Any, targets: Any, says: str
) -> None:
    assert not_one_tensor(logits, targets) is not None
    with pytest.raises(ValueError, match="^" + re.escape(says)):
        Accuracy.of(logits, targets)
    with caplog.at_level("WARNING", logger="stiffmon_agent"):
        assert math.isnan(step_accuracy(logits, targets, set()))  # type: ignore[arg-type]
    (line,) = [r.message for r in caplog.records]
    assert line.startswith(nan_accuracy_console("", seen=False))
    assert says in line and not any(word in line for word in RAW), line


def test_binary_losses_ask_for_0_1_targets() -> None:
    said = not_one_tensor(LOGITS[:, 0], CTC, threshold=0.0)
    assert said is not None and "not one 0/1 tensor per prediction" in said
    assert not_one_tensor(LOGITS, TARGETS) is None and not_one_tensor(LOGITS, TARGETS, 0.0) is None


@pytest.mark.parametrize(
    ("logits", "targets", "says", "counted_says"),
    [
        (
            TARGETS,
            TARGETS,
            "the logits are int64 (predicted classes?), not class scores: pass the model's "
            "scores, before any argmax, as logits=",
            "(predicted classes?), not class scores",
        ),
        (
            LOGITS,
            torch.softmax(LOGITS, 1),
            "logits and targets have the same shape (8, 4) (probability targets, a binary "
            "classifier's or a regression's outputs): no class-index accuracy (for soft targets,"
            " pass their argmax over the classes as targets=)",
            "no class-index accuracy (for soft targets, pass their argmax over the classes",
        ),
    ],
    ids=["predicted-classes", "soft-targets"],
)
def test_tensors_without_an_accuracy_say_what_to_pass(
    caplog: pytest.LogCaptureFixture,
    logits: torch.Tensor,
    targets: torch.Tensor,
    says: str,
    counted_says: str,
) -> None:
    """Kept (checked on the publisher thread) and counted (on the training thread) alike."""
    problems: set[str] = set()
    got = accuracies([Accuracy.of(logits, targets)], problems=problems)
    assert math.isnan(got[0]) and len(problems) == 1 and says in problems.pop()
    repeat = DEFER_MAX_ELEMENTS // logits.numel() + 1  # counted at once: too big to keep
    big_logits = logits.repeat(repeat, *([1] * (logits.dim() - 1)))
    big_targets = targets.repeat(repeat, *([1] * (targets.dim() - 1)))
    with caplog.at_level("WARNING", logger="stiffmon_agent"):
        assert math.isnan(step_accuracy(big_logits, big_targets, set()))  # type: ignore[arg-type]
    (line,) = [r.message for r in caplog.records]
    assert counted_says in line and not any(word in line for word in RAW), line


def test_ctc_targets_through_the_agent_say_why_in_words(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The tester's CTC run: ``agent.step(loss, logits, (targets, input_lengths,
    target_lengths))`` at every step; one console line, in words, and NaN accuracies."""
    steps: list[Any] = [(torch.randn(4, 3), CTC)] * 3
    got, events, said = _run(tmp_path, torch.nn.CrossEntropyLoss(), steps, caplog)
    assert len(got) == 3 and all(math.isnan(x) for x in got)
    assert len(said) == 1 and "the targets are a tuple of 3 tensors" in said[0]
    assert not any(word in said[0] for word in RAW)
    # on the screen too, not only on the console
    assert events == [
        "no accuracy at step 0 (NaN) and at steps like it: the targets are a tuple of 3 "
        "tensors, not one class-index tensor per prediction: pass targets= the class indices, "
        "or leave logits/targets out"
    ]


def test_the_event_of_a_run_without_accuracy_reads_naturally() -> None:
    """Once said ``NaN at every step from the first up to step 0``."""
    why = "logits and targets have the same shape (40, 3)"
    assert nan_accuracy_event(why, 0, seen=False) == (
        f"accuracy is unavailable for this run: NaN at its first step (step 0): {why}"
    )
    assert nan_accuracy_event(why, 500, seen=False, first_step=500) == (
        f"accuracy is unavailable for this run: NaN at its first step (step 500): {why}"
    )
    assert nan_accuracy_event(why, 12, seen=False, first_step=0) == (
        f"accuracy is unavailable for this run: NaN at every step so far (steps 0 to 12): {why}"
    )
    assert nan_accuracy_event(why, 12, seen=False) == (
        f"accuracy is unavailable for this run: NaN at every step so far (up to step 12): {why}"
    )
    assert nan_accuracy_event(why, 40, seen=True, first_step=0) == (
        f"accuracy is NaN at some steps of the batch up to step 40: {why}"
    )
    for text in (
        nan_accuracy_event(why, s, seen=False, first_step=f) for s, f in ((0, 0), (0, None))
    ):
        assert "up to step 0" not in text and "every step" not in text
    # the console line (said once, on the first failing step) is as it was
    assert nan_accuracy_console("why", seen=False) == (
        "stiffmon: accuracy unavailable for this run (NaN from the first step on): why"
    )
    assert (
        nan_accuracy_console("why", seen=True) == "stiffmon: no accuracy for some steps (NaN): why"
    )


@pytest.mark.parametrize(
    ("loss_fn", "logits", "targets"),
    [
        (
            torch.nn.PoissonNLLLoss(),
            torch.randn(8, 2),
            torch.poisson(torch.full((8, 2), 2.0, dtype=torch.float32)),
        ),
        (torch.nn.MSELoss(), torch.randn(8, 3), torch.randn(8, 3) * 3),
        (torch.nn.HuberLoss(), torch.randn(8), torch.randn(8) * 3),
        (torch.nn.L1Loss(), torch.randn(8, 1), torch.randn(8, 1) * 3),  # one output: no classes
    ],
    ids=["poisson-counts", "mse", "huber-1d", "l1-one-output"],
)
def test_a_regression_is_told_that_accuracy_does_not_apply(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    loss_fn: torch.nn.Module,
    logits: torch.Tensor,
    targets: torch.Tensor,
) -> None:
    """Real-valued targets (outside [0, 1]) get the regression's way out, not the advice for
    soft class targets (their argmax)."""
    torch.manual_seed(0)
    targets[0].fill_(2.0)  # at least one value outside [0, 1]
    got, events, said = _run(tmp_path, loss_fn, [(logits, targets)] * 3, caplog)
    assert all(math.isnan(x) for x in got) and len(events) == 1 and len(said) == 1
    for text in (events[0], said[0]):
        assert "accuracy does not apply to a regression loss" in text
        assert "call agent.step(loss) without logits and targets" in text
        assert "argmax" not in text and "soft targets" not in text


def test_soft_class_targets_keep_their_advice_and_unread_targets_get_both() -> None:
    soft = torch.softmax(LOGITS, 1)
    with pytest.raises(ValueError) as info:
        check_comparable(LOGITS, soft)
    said = str(info.value)
    assert "for soft targets, pass their argmax over the classes as targets=" in said
    assert "regression loss" not in said
    big = torch.rand(DEFER_MAX_ELEMENTS + 8, 2) * 5  # not read: both ways out are said
    with pytest.raises(ValueError) as info:
        check_comparable(torch.randn(big.shape), big)
    said = str(info.value)
    assert "pass their argmax over the classes" in said and "regression loss" in said
