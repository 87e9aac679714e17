"""An optimizer step's accuracy over its gradient-accumulation micro-batches (the callbacks'
:class:`StepAccuracy`), through the agent's own accuracy path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from stiffmon import protocol as p
from stiffmon.session import read_session
from stiffmon_agent import Agent
from stiffmon_agent.accuracy import DEFER_MAX_ELEMENTS
from stiffmon_agent.integrations._common import StepAccuracy


def _hits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    keep = targets >= 0
    return int(((logits.argmax(-1) == targets) & keep).sum()), int(keep.sum())


def _micro(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, classes, (n,), generator=g)
    targets[::4] = -100  # padding: no prediction
    return torch.randn(n, classes, generator=g), targets


def _recorded(tmp_path: Path, steps: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> list[float]:
    """The accuracy column an agent records for these steps' micro-batches."""
    model = torch.nn.Linear(2, 2)
    rec = tmp_path / "acc.stiff"
    agent = Agent(model, torch.nn.CrossEntropyLoss(), None, endpoint="", record=rec, registry=False)
    acc = StepAccuracy()
    for micro in steps:
        for logits, targets in micro:
            acc.add(logits, targets)
        agent.step(0.5, *acc.take())
    agent.close()
    msgs = read_session(rec)[0]
    return np.concatenate([m.column("accuracy") for m in msgs if isinstance(m, p.Columns)]).tolist()


def test_kept_counted_and_mixed_micro_batches_count_all_their_predictions(tmp_path: Path) -> None:
    big = DEFER_MAX_ELEMENTS // 4 + 1  # (big, 4) logits are counted at once
    steps = [
        [_micro(8, 4, 1)],  # one micro-batch: the agent's usual path
        [_micro(8, 4, 2), _micro(6, 4, 3), _micro(8, 4, 4)],  # kept, joined
        [_micro(big, 4, 5), _micro(big, 4, 6)],  # counted
        [_micro(8, 4, 7), _micro(big, 4, 8)],  # mixed
        [_micro(8, 4, 9), _micro(8, 5, 10)],  # kept, two layouts
    ]
    expected = []
    for micro in steps:
        counts = np.array([_hits(*m) for m in micro])
        expected.append(counts[:, 0].sum() / counts[:, 1].sum())
    assert _recorded(tmp_path, steps) == expected


def test_a_micro_batch_that_does_not_compare_makes_the_step_nan(tmp_path: Path) -> None:
    bad = (torch.randn(8, 4), torch.zeros(5, dtype=torch.long))
    big_bad = (torch.randn(DEFER_MAX_ELEMENTS, 4), torch.zeros(5, dtype=torch.long))
    good = _micro(8, 4, 1)
    got = _recorded(tmp_path, [[good, bad], [big_bad, good], [good, good]])
    assert math.isnan(got[0]) and math.isnan(got[1])
    assert got[2] == _hits(*good)[0] / _hits(*good)[1]


def test_a_kept_micro_batch_changed_in_place_makes_the_step_nan() -> None:
    acc = StepAccuracy()
    logits, targets = _micro(8, 4, 1)
    acc.add(logits, targets)
    acc.add(*_micro(8, 4, 2))
    targets.fill_(0)  # a reused buffer, before the step was counted
    counted, _ = acc.take()
    assert math.isnan(float(counted))
    assert acc.take() == (None, None)  # reset
