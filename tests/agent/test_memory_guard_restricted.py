"""The memory guard prices a sharpness restricted to the touched embedding rows at its own
vector size (the last warm start's), not at every parameter: a huge table's measurement that
now needs a few MB was capped or skipped as if its vectors held the whole table."""

from __future__ import annotations

import pytest
from torch import nn

from stiffmon_agent import memory_guard
from stiffmon_agent.memory_guard import MemoryGuard, MemorySkipped


def test_a_restricted_dimension_fits_where_the_whole_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = nn.Embedding(100_000, 16)  # 1.6M float32 parameters: 6.4 MB per vector
    monkeypatch.setattr(memory_guard, "free_bytes", lambda device: 40_000_000)
    guard = MemoryGuard()
    with pytest.raises(MemorySkipped):
        guard.plan("sharpness", model, 50)
    plan = guard.plan("sharpness", model, 50, dim=2_000)
    assert plan.products == 50 and not plan.capped
