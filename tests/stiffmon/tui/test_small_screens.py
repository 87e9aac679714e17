"""Small terminals and extreme data: titles shortened where they would run into their
neighbours, threshold labels kept off the curves, log-y ticks at regular decades."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
from rich.console import Group
from rich.text import Text

from stiffmon.tui.curvature import DensityMap
from stiffmon.tui.renderables import (
    HLine,
    Line,
    LineChart,
    fit_title,
    fmt_tick,
    log_labels,
    log_ticks,
)
from stiffmon.tui.views.base import ChartView
from stiffmon.tui.views.noise import BATCH_TITLE
from tests.stiffmon.tui.test_app import replay_app

SEPARATORS = (", ", " — ", " (")


def _full_title(chart: object) -> str:
    if isinstance(chart, Group):
        chart = chart.renderables[0]
    if isinstance(chart, Text):  # the suggested-batch table without its chart, under a title
        return BATCH_TITLE
    assert isinstance(chart, LineChart | DensityMap), chart
    return chart.title


def _cut_sensibly(shown: str, full: str) -> bool:
    """Whether ``shown`` is ``full``, or ``full`` cut before one of its separators (never inside
    a word or the run's name, never ending in a dangling ``—``), or ends in ``…``."""
    if shown == full or shown.endswith("…"):
        return True
    return full.startswith(shown) and full[len(shown) :].startswith(SEPARATORS)


def test_fit_title_drops_the_run_then_clauses_then_cuts_with_an_ellipsis() -> None:
    title = "gradient tests, dashed: chosen θ — sgd lr=0.01"
    assert fit_title(title, 60) == title
    assert fit_title(title, 40) == "gradient tests, dashed: chosen θ"
    assert fit_title(title, 27) == "gradient tests"
    assert fit_title(title, 10) == "gradient…"
    assert fit_title(title, 10, ascii=True) == "gradien..."
    assert fit_title("density 6/6, step 500 — sgd lr=0.01", 27) == "density 6/6, step 500"
    assert fit_title("Hessian trace (Hutchinson), grey: ±2 standard errors", 27) == (
        "Hessian trace (Hutchinson)"
    )
    assert fit_title("density by step (log colour) — run", 20) == "density by step"
    for width in range(1, 60):
        assert len(fit_title(title, width)) <= width


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_noise_and_curvature_titles_never_run_into_each_other(
    tmp_path: Path, size: tuple[int, int]
) -> None:
    app = replay_app(tmp_path)
    async with app.run_test(size=size) as pilot:
        for key, view in (("5", "noise"), ("h", "curvature")):
            await pilot.press(key)
            await pilot.pause()
            charts = list(app.screen.query(f"#{view} ChartView").results(ChartView))
            assert len(charts) >= 4
            for w in charts:
                line = w.render_line(0).text
                assert len(line) <= w.region.width
                shown = re.split(r" [■#] ", line)[0].rstrip()  # the title, without a legend
                full = _full_title(w.last)
                assert shown, (view, full)
                assert _cut_sensibly(shown, full), (view, size, shown, full)


def _plot_rows(chart: LineChart, width: int, height: int) -> list[str]:
    """The plot rows of a chart (no title, no x axis), the y-axis column included."""
    text = "".join(s.text for s in chart.render_lines(width, height))
    rows = text.splitlines()
    return rows[1 if chart.title else 0 : -2]


@pytest.mark.parametrize("ascii_only", [False, True])
def test_threshold_label_is_drawn_on_empty_cells_only(ascii_only: bool) -> None:
    x = np.arange(400.0)
    lines = [
        Line(x, 3 - np.exp(-x / 100), "red"),  # reaches the top row on the right
        Line(x, 2.9 - np.exp(-x / 50), "blue"),
    ]
    bare = _plot_rows(LineChart(lines, ascii=ascii_only), 80, 12)
    chart = LineChart(lines, [HLine(190.0, "red", "thr")], ascii=ascii_only)
    drawn = _plot_rows(chart, 80, 12)
    label = ("^" if ascii_only else "↑") + "thr 190"
    (r,) = [r for r, row in enumerate(drawn) if label in row]
    c = drawn[r].index(label)
    assert bare[r][c : c + len(label)].strip() == ""  # nothing of a curve is covered
    drawn[r] = drawn[r][:c] + " " * len(label) + drawn[r][c + len(label) :]
    assert drawn == bare  # and nothing else is changed


def test_threshold_label_is_left_out_where_curves_fill_the_top() -> None:
    rng = np.random.default_rng(0)
    x = np.arange(4000.0)
    noise = Line(x, rng.uniform(0.0, 3.0, x.size), "red")  # every cell carries dots
    bare = _plot_rows(LineChart([noise]), 60, 12)
    drawn = _plot_rows(LineChart([noise], [HLine(190.0, "red", "thr")]), 60, 12)
    assert drawn == bare


def test_log_ticks_are_regular_decades() -> None:
    assert log_ticks(0.0, 3.0, 8) == [0.0, 1.0, 2.0, 3.0]
    assert log_ticks(0.0, 29.0, 4) == [0.0, 10.0, 20.0]
    assert log_ticks(-7.5, 29.2, 5) == [0.0, 10.0, 20.0]
    assert log_ticks(-3.2, 12.0, 4) == [0.0, 5.0, 10.0]
    assert log_ticks(0.2, 0.8, 4) == []
    assert log_labels([0.0, 1.0, 2.0, 3.0]) == ["1", "10", "100", "1k"]
    assert log_labels([0.0, 10.0, 20.0]) == ["1e0", "1e10", "1e20"]
    assert fmt_tick(1e29) == "1e29" and fmt_tick(3e-5) == "3e-5" and fmt_tick(2e5) == "2e5"


@pytest.mark.parametrize("height", [8, 12, 20, 40])
def test_log_axis_over_29_decades_is_labelled_at_even_exponents(height: int) -> None:
    x = np.arange(300.0)
    y = np.exp(x / 299 * np.log(1e29))
    chart = LineChart([Line(x, y, "red")], log_y=True, title="loss")
    labels = [row.split("┤")[0].strip() for row in _plot_rows(chart, 80, height) if "┤" in row]
    assert len(labels) >= 2
    assert all(re.fullmatch(r"1e-?\d+", lab) for lab in labels), labels
    exponents = [int(lab[2:]) for lab in labels]
    steps = {a - b for a, b in itertools.pairwise(exponents)}
    assert len(steps) == 1 and steps.pop() > 0, labels
    assert all(e % (exponents[0] - exponents[1]) == 0 for e in exponents)
