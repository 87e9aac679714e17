"""The ``accuracy-unavailable`` event of a run without an accuracy reads naturally: ``NaN at its
first step (step 0)`` or ``NaN at every step so far (steps 0 to 5)``, never ``NaN at every step
from the first up to step 0`` (needs the emitter to word it with ``nan_accuracy_event``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.agent.test_accuracy_layouts import _run

SOFT = (torch.randn(8, 3), torch.softmax(torch.randn(8, 3), 1))


def test_one_step_without_accuracy_is_its_first_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, events, _ = _run(tmp_path, torch.nn.CrossEntropyLoss(), [SOFT], caplog)
    (event,) = events
    assert event.startswith(
        "accuracy is unavailable for this run: NaN at its first step (step 0): "
    )
    assert "up to step 0" not in event


def test_a_batch_of_steps_without_accuracy_says_which(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, events, _ = _run(tmp_path, torch.nn.CrossEntropyLoss(), [SOFT] * 6, caplog)
    (event,) = events
    assert event.startswith("accuracy is unavailable for this run: NaN at ")
    assert "from the first up to" not in event
