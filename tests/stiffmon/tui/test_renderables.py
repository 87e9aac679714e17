"""Renderables rendered to exact strings."""

from __future__ import annotations

import numpy as np
from rich.console import Console

from stiffmon.tui.renderables import (
    Heatmap,
    HLine,
    Line,
    LineChart,
    Marker,
    diverging,
    fmt_tick,
    nice_ticks,
    thin_minmax,
)


def render(renderable: object, width: int) -> str:
    console = Console(width=width, color_system=None, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


def test_ticks() -> None:
    assert nice_ticks(0, 10, 5) == [0, 2, 4, 6, 8, 10]
    assert nice_ticks(0.13, 0.61, 4) == [0.2, 0.4, 0.6]
    assert [fmt_tick(v) for v in (0, 0.05, 1500, 2e-5, 3e6)] == ["0", "0.05", "1.5k", "2e-5", "3e6"]


def test_minmax_thinning_keeps_spikes() -> None:
    x = np.arange(1000.0)
    y = np.zeros(1000)
    y[500] = 9.0
    cols, lo, hi = thin_minmax(x, y, 0.0, 999.0, 10)
    assert cols.tolist() == list(range(10)) and hi.max() == 9.0 and lo.min() == 0.0


def test_ascii_line_chart_exact() -> None:
    chart = LineChart(
        [Line(np.array([0.0, 1, 2, 3, 4]), np.array([0.0, 1, 2, 3, 4]), "red")],
        hlines=[HLine(2.0, "blue")],
        markers=[Marker(4.0, 4.0, "red")],
        ascii=True,
        height=7,
    )
    expected = (
        "4 |                **#\n"
        "  |            *****  \n"
        "2 |- - - -****** - - -\n"
        "  |   *****           \n"
        "0 |****               \n"
        "  +-------------------\n"
        "   0        2        4\n"
    )
    assert render(chart, 22) == expected


def test_braille_line_chart_exact() -> None:
    chart = LineChart(
        [Line(np.array([0.0, 1.0]), np.array([0.0, 1.0]), "red")], height=5, x_label=""
    )
    assert render(chart, 12) == (
        "  1 ┤    ⢀⣠⠞\n0.5 ┤  ⢀⡴⠋  \n  0 ┤⣠⠞⠉    \n    └───────\n     0 0.5 1\n"
    )


def test_empty_chart() -> None:
    out = render(LineChart([], height=5, empty_text="nothing"), 20)
    assert "nothing" in out and len(out.splitlines()) == 5


def test_log_y_drops_non_positive_values() -> None:
    chart = LineChart(
        [Line(np.array([0.0, 1, 2]), np.array([-1.0, 10, 1000]), "red")],
        log_y=True,
        ascii=True,
        height=6,
    )
    out = render(chart, 20)
    assert "1k" in out and "10" in out


def test_heatmap_ascii_exact() -> None:
    m = np.array([[1.0, -1.0], [0.0, np.nan]])
    hm = Heatmap(m, ["a", "b"], ["a", "b"], cursor=(0, 1), ascii=True, cell_width=3)
    out = render(hm, 30)
    assert out.splitlines() == [
        "   a  b ",
        "a ###[=]",
        "b ...???",
        "  -1 ====----....++++#### +1",
        "a → b: -1.000",
    ]


def test_heatmap_half_blocks_pair_rows() -> None:
    m = np.zeros((3, 3))
    out = render(Heatmap(m, cell_width=2), 30).splitlines()
    assert out[1].startswith("0·1 ▀▀▀▀▀▀") and out[2].startswith("  2 ▀▀▀▀▀▀")


def test_diverging_colour_map() -> None:
    assert diverging(0.0) == "#dddddd"
    assert diverging(1.0) == "#b40426" and diverging(5.0) == "#b40426"
    assert diverging(-1.0) == "#3b4cc0"
    assert diverging(float("nan")) == "#303030"
