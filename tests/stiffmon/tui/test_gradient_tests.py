"""The gradient-tests chart always says which line is which test: full labels where they fit,
short ones (norm, inner, ortho) in the small panel of an 80×24 terminal."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.style import Style

from stiffmon.tui.curvature import gradient_tests_chart
from stiffmon.tui.gradient_tests import COLORS, GradientTestsChart
from stiffmon.tui.views.base import ChartView
from tests.stiffmon.tui.test_app import replay_app
from tests.stiffmon.tui.test_curvature import curvature_store
from tests.stiffmon.tui.test_renderables import render

FULL = " ■ norm θ  ■ inner-product θ  ■ orthogonality ν "
SHORT = " ■ norm  ■ inner  ■ ortho "


def _chart(ascii: bool = False, height: int = 7) -> GradientTestsChart:
    chart = gradient_tests_chart(
        curvature_store().runs["r"], x_time=False, log_y=True, ascii=ascii, height=height
    )
    assert isinstance(chart, GradientTestsChart)
    return chart


def test_a_small_panel_shows_the_short_legend_on_a_line_of_its_own() -> None:
    lines = render(_chart(), 28).splitlines()
    assert lines[0].rstrip() == "gradient tests"
    assert lines[1].rstrip() == SHORT.rstrip()
    assert len(lines) == 7 and lines[-1].split() == ["0", "50", "100"]  # the axis still there
    ascii = render(_chart(ascii=True), 28).splitlines()
    assert ascii[1].rstrip() == " # norm  # inner  # ortho"


def test_the_full_legend_where_it_fits() -> None:
    lines = render(_chart(height=14), 48).splitlines()
    assert lines[0].rstrip() == "gradient tests, dashed: chosen θ — sgd"
    assert lines[1] == FULL
    wide = render(_chart(height=7), 120).splitlines()  # beside the title: no row given up
    assert wide[0].rstrip() == "gradient tests, dashed: chosen θ — sgd" + FULL.rstrip()
    assert len(wide) == 7


def test_each_box_has_its_lines_colour() -> None:
    chart = _chart()
    segments = [s for row in chart._header(28, 7) for s in row]
    boxes = [s.style for s in segments if s.text == " ■"]
    assert boxes == [Style.parse(c) for c in COLORS]
    assert [ln.color for ln in chart.lines] == list(COLORS)


def test_a_chart_too_short_for_a_legend_line_keeps_its_plot() -> None:
    lines = render(_chart(height=5), 28).splitlines()
    assert lines[0].rstrip() == "gradient tests" and "■" not in "".join(lines)


@pytest.mark.parametrize(("size", "legend"), [((80, 24), SHORT), ((120, 40), FULL)])
async def test_the_noise_view_shows_the_legend(
    tmp_path: Path, size: tuple[int, int], legend: str
) -> None:
    app = replay_app(tmp_path)
    async with app.run_test(size=size) as pilot:
        await pilot.press("5")
        await pilot.pause()
        charts = [
            w
            for w in app.screen.query("#noise ChartView").results(ChartView)
            if isinstance(w.last, GradientTestsChart)
        ]
        assert len(charts) == 1
        head = [charts[0].render_line(i).text for i in range(2)]
        assert legend.strip() in "\n".join(head), head
