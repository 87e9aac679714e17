"""Line charts without colours (``NO_COLOR``): every curve, legend entry and read-out value is
told apart by a tag (``1``, ``2``…), not by a colour nobody sees."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from stiffmon.tui.renderables.chart_items import Line, StepLine, tags
from stiffmon.tui.renderables.linechart import LineChart
from stiffmon.tui.views import ChartView
from tests.stiffmon.tui.test_app import replay_app, screen_text
from tests.stiffmon.tui.test_renderables import render

X = np.arange(100.0)


def three_runs() -> list[Line]:
    """Three decaying curves, ending at 1/3, 1/5 and 1/7 (lr=0.01 highest)."""
    return [
        Line(X, 1 / (1 + X * (k + 1) / 49.5), c, f"lr=0.0{k + 1}")
        for k, c in enumerate(("red", "green", "blue"))
    ]


def threshold() -> StepLine:
    return StepLine(np.array([0.0, 50.0]), np.array([0.5, 0.7]), "green", "thr")


@pytest.mark.parametrize("ascii", [False, True])
def test_without_colour_the_legend_and_read_out_carry_each_line_s_tag(ascii: bool) -> None:
    chart = LineChart(
        three_runs(), steplines=[threshold()], title="λ1_H", no_color=True, ascii=ascii,
        cursor_x=60, height=16,
    )  # fmt: skip
    out = render(chart, 70).splitlines()
    assert out[0].split() == [
        "l1_H" if ascii else "λ1_H",
        "1",
        "lr=0.01",
        "2",
        "lr=0.02",
        "3",
        "lr=0.03",
    ]
    dash = "-" if ascii else "╌"
    # each value behind its line's tag; the threshold behind the tag of its run (its colour)
    expect = [f"{1 / (1 + 60 * k / 49.5):.4g}" for k in (1, 2, 3)]
    assert out[1].split() == [
        "step", "60:", "1", expect[0], "2", expect[1], "3", expect[2], f"{dash}2", "0.7",
    ]  # fmt: skip
    # each curve's last point carries its tag, the top curve's above the lower ones'
    ends = {ch: r for r, line in enumerate(out) for ch in "123" if line.rstrip().endswith(ch)}
    assert set(ends) == {"1", "2", "3"} and ends["1"] < ends["2"] < ends["3"]


def test_with_colours_the_boxes_stay_and_no_tag_is_drawn() -> None:
    out = render(LineChart(three_runs(), title="λ1_H", cursor_x=60, height=16), 70).splitlines()
    assert out[0].split()[1:] == ["■", "lr=0.01", "■", "lr=0.02", "■", "lr=0.03"]
    assert out[1].split()[2::2] == ["■", "■", "■"]
    assert not any(line.rstrip()[-1:] in "123" for line in out[2:-2])


def test_tags_go_to_distinct_labels_and_not_to_a_lone_line() -> None:
    lines = three_runs()
    chart = LineChart([*lines, Line(X, X, "red", "lr=0.01")], no_color=True)
    assert tags(chart.lines) == {"lr=0.01": "1", "lr=0.02": "2", "lr=0.03": "3"}
    assert tags(lines[:1]) == {}


def test_an_ascii_chart_keeps_where_a_line_stops_being_current() -> None:
    """ASCII mode rebuilt its lines from x, y, colour and label only: a run's value read on at
    the cursor past the run's last step (``end``) and after a ``stale`` mark."""
    line = Line(X, X / 10, "red", "run", end=50.0)
    stale = Line(X[:30], X[:30] / 10, "blue", "other", stale=(40.0,))
    for ascii in (False, True):
        chart = LineChart([line, stale], ascii=ascii, cursor_x=60.0, height=12)
        assert all(math.isnan(ln.value_at(60.0)) for ln in chart.lines)
        assert "6 " not in render(chart, 60).splitlines()[1]  # no 6.0 for the run that ended


async def test_no_color_tags_the_runs_on_the_sharpness_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    app = replay_app(tmp_path)
    assert app.no_color
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("4")
        await pilot.pause()
        text = screen_text(app)
        for tag, run in (("1", "sgd lr=0.01"), ("2", "sgd lr=0.05"), ("3", "sgd lr=0.2")):
            assert f"{tag} {run}" in text  # the run list: the tag in place of the colour box
        assert "■" not in text
        await pilot.press("comma")  # the cursor: each value behind its run's tag
        await pilot.pause()
        chart = next(w for w in app.query(ChartView) if w.display and w.region.height)
        words = chart.render_line(1).text.split()
        assert words[0] == "step" and words[2::2] == ["1", "2", "3", "╌1", "╌2", "╌3"]
        assert [float(w) for w in words[9::2]] == [200.0, 40.0, 10.0]  # 2/η of lr 0.01, .05, .2


def test_a_narrow_read_out_keeps_a_space_between_a_tag_and_its_value() -> None:
    """Compact, a value follows its box (■0.455); a tag's value after a space: `1 0.455`, not
    `10.455` (it read `step 1500: 11.32 211.9` for 1.32 and 11.9 on the overview)."""
    chart = LineChart(three_runs(), steplines=[threshold()], no_color=True, cursor_x=60, height=12)
    readout = render(chart, 40).splitlines()[1]
    assert readout.split() == ["step", "60:", "1", "0.452", "2", "0.292", "3", "0.216", "╌2", "0.7"]
