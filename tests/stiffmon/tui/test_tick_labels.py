"""Axis tick labels never repeat: a narrow range gets more digits, not the same label twice."""

from __future__ import annotations

import pytest

from stiffmon.tui.renderables.axes import fmt_tick, nice_ticks, tick_labels


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(2.093, 2.112), (0.9992, 0.9999), (1e5, 3e5), (12_600.0, 12_700.0), (0.0, 1.0), (1e-6, 5e-6)],
)
def test_labels_of_distinct_ticks_are_distinct(lo: float, hi: float) -> None:
    ticks = nice_ticks(lo, hi, 4)
    labels = tick_labels(ticks)
    assert len(ticks) >= 2 and len(set(labels)) == len(labels), labels
    for t, lab in zip(ticks, labels, strict=True):  # each still reads as its value
        value = float(lab[:-1]) * 1e3 if lab.endswith("k") else float(lab)
        assert value == pytest.approx(t, rel=1e-9, abs=1e-12), (t, lab)


def test_short_labels_stay_short() -> None:
    assert tick_labels([0.0, 0.5, 1.0]) == ["0", "0.5", "1"]
    assert fmt_tick(12_665.7) == "12.7k"  # a threshold marker: 3 digits, not 12.6657k
    assert fmt_tick(2e5) == "2e5"
