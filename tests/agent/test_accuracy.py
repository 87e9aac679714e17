"""A step's accuracy: kept small logits counted in a few kernels, big ones counted at once."""

from __future__ import annotations

import gc
import math
import weakref
from typing import Any

import numpy as np
import pytest
import torch

from stiffmon_agent import Agent
from stiffmon_agent import accuracy as acc_mod
from stiffmon_agent.accuracy import (
    DEFER_MAX_ELEMENTS,
    STACK_MAX_ELEMENTS,
    Accuracy,
    accuracies,
    step_accuracy,
)


def _reference(logits: torch.Tensor, targets: torch.Tensor) -> float:
    hits = [
        int(a) == int(b)
        for a, b in zip(logits.argmax(-1).reshape(-1), targets.reshape(-1), strict=True)
    ]
    return sum(hits) / len(hits)


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
    assert a.logits is None and a.hits is not None and a.hits.ndim == 0 and a.n == 4
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
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = Agent(model, torch.nn.CrossEntropyLoss(), opt, endpoint="", registry=False)
    agent._columns.interval = 1e9  # every row stays in the open batch
    with caplog.at_level("WARNING", logger="stiffmon_agent"):
        for _ in range(3):
            agent.step(torch.tensor(0.5), torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
        agent.step(torch.tensor(0.5), torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    at = list(agent._columns._names).index("accuracy")
    col = [values[at] for _, _, values in agent._columns._rows[-4:]]
    assert all(isinstance(v, float) and math.isnan(v) for v in col[:3])
    assert isinstance(col[3], Accuracy) and col[3].logits is not None
    assert sum("no accuracy" in r.message for r in caplog.records) == 1
    assert math.isnan(step_accuracy(torch.randn(2, 3), torch.zeros(3), set()))  # type: ignore[arg-type]
    agent.close()


def test_bfloat16_logits_are_counted_in_torch() -> None:
    """numpy has no bfloat16: those steps take the torch path and still match the loop."""
    g = torch.Generator().manual_seed(1)
    steps = [
        (torch.randn(32, 7, generator=g).bfloat16(), torch.randint(0, 7, (32,), generator=g))
        for _ in range(5)
    ]
    got = accuracies([Accuracy.of(lg, t) for lg, t in steps])
    np.testing.assert_allclose(got, [_reference(lg, t) for lg, t in steps], rtol=0, atol=1e-15)
