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
    StepHeatmap,
    XMark,
    asciify,
    diverging,
    fmt_tick,
    nice_ticks,
    short_labels,
    thin_minmax,
)
from stiffmon.tui.renderables.axes import distinct_names
from stiffmon.tui.renderables.comparetable import compare_table
from stiffmon.tui.renderables.eventlog import EventLog, LogRow
from stiffmon.tui.renderables.runlist import RunList, RunRow


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
        markers=[Marker(4.0, 4.0, "red", "◇")],
        ascii=True,
        height=7,
    )
    expected = (
        "4 |                **o\n"
        "  |            *****  \n"
        "2 |- - - -****** - - -\n"
        "  |   *****           \n"
        "0 |****               \n"
        "  ++--------+--------+\n"
        "   0        2        4\n"
    )
    assert render(chart, 22) == expected


def test_braille_line_chart_exact() -> None:
    chart = LineChart(
        [Line(np.array([0.0, 1.0]), np.array([0.0, 1.0]), "red")], height=5, x_label=""
    )
    assert render(chart, 12) == (
        "  1 ┤    ⢀⣠⠞\n0.5 ┤  ⢀⡴⠋  \n  0 ┤⣠⠞⠉    \n    └┬──┬──┬\n     0 0.5 1\n"
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


def test_log_y_with_only_non_positive_values_says_so_not_yet() -> None:
    def chart(lines: list[Line], log_y: bool) -> str:
        c = LineChart(
            lines, log_y=log_y, height=8, empty_text="no β yet", log_empty_text="β: none > 0"
        )
        return render(c, 40)

    zeros = Line(np.arange(4.0), np.zeros(4), "red")
    assert "yet" not in chart([zeros], log_y=False) and "0" in chart([zeros], log_y=False)
    out = chart([zeros], log_y=True)
    assert "β: none > 0" in out and "yet" not in out
    # a series that is really empty is still "not yet"
    assert "no β yet" in chart([Line(np.array([]), np.array([]), "red")], log_y=True)
    assert "no β yet" in chart([], log_y=True)
    # the default says what is wrong and which key draws it
    default = render(LineChart([zeros], log_y=True, ascii=True, height=8), 40)
    assert "no positive values to draw on a" in default and "(l: linear y axis)" in default
    assert "no data yet" not in default


def test_a_long_empty_text_wraps_instead_of_being_cut() -> None:
    out = render(LineChart([], height=7, empty_text="word " * 12), 20).splitlines()
    assert len(out) == 7 and sum("word" in row for row in out) == 3


def test_heatmap_ascii_exact() -> None:
    m = np.array([[1.0, -1.0], [0.0, np.nan]])
    hm = Heatmap(m, ["a", "b"], ["a", "b"], cursor=(0, 1), ascii=True, cell_width=3)
    out = render(hm, 30)
    assert out.splitlines() == [
        "   a  b ",
        "a ###[=]",
        "b ...???",
        "  -1 ====----....++++#### +1",
        "a -> b: -1.000",
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


def test_axes_meet_and_ticks_sit_under_their_data() -> None:
    """The corner is under the y axis, each x label is centred under its ┬, and a point at
    x = 2 is drawn in the column of the "2" tick."""
    x = np.array([0.0, 2.0, 4.0])
    chart = LineChart([Line(x, np.array([0.0, 0.0, 0.0]), "red")], ascii=True, height=5)
    lines = render(chart, 22).splitlines()
    axis, labels = lines[-2], lines[-1]
    bar = lines[0].index("|")
    assert axis.index("+") == bar  # the corner meets the y axis
    ticks = [i for i, ch in enumerate(axis) if ch == "+"][1:]
    assert [labels[i] for i in ticks] == ["0", "2", "4"]
    row = next(ln for ln in lines if "*" in ln)
    assert row[ticks[1]] == "*" and row[ticks[0]] == "*" and row[ticks[2]] == "*"


def test_legend_cursor_readout_and_marks() -> None:
    x = np.arange(5.0)
    chart = LineChart(
        [Line(x, x, "red", "up"), Line(x, 4 - x, "blue", "down")],
        title="t",
        ascii=True,
        height=9,
        cursor_x=1.0,
        x_marks=[XMark(3.0, "red")],
    )
    out = render(chart, 30).splitlines()
    assert out[0].startswith("t # up  # down")
    assert out[1].startswith("step 1: # 1 # 3")
    assert "^" in out[-2] and "x" in out[-2]  # cursor and skipped-measurement marks on the axis
    assert sum(ln.count(":") for ln in out[2:-2]) >= 2  # the cursor column, under the curves


def test_single_curve_has_no_legend_and_zoom_clips() -> None:
    x = np.arange(100.0)
    chart = LineChart([Line(x, x, "red", "only")], ascii=True, height=6, x_range=(50.0, 60.0))
    out = render(chart, 30)
    assert "only" not in out
    assert out.splitlines()[-1].split()[:3] == ["50", "55", "60"]
    assert chart.plot_box is not None and chart.plot_box[2:] == (50.0, 60.0)


def test_heatmap_values_and_short_labels() -> None:
    m = np.array([[0.5, -0.25], [0.0, 1.0]])
    hm = Heatmap(
        m,
        ["class_0", "class_1"],
        ["class_0", "class_1"],
        cell_width=7,
        half_block=False,
        values=True,
        ascii=True,
    )
    out = render(hm, 60).splitlines()
    assert out[0].split() == ["0", "1", "(class_…)"]
    assert "+0.50" in out[1] and "-0.25" in out[1] and "+1.00" in out[2]
    assert short_labels(["cat", "dog"]) == (["cat", "dog"], "")


def test_step_heatmap_resamples_to_the_width() -> None:
    m = np.tile(np.linspace(-1, 1, 300), (2, 1))
    out = render(
        StepHeatmap(m, ["conv1", "fc"], list(range(0, 3000, 10)), ascii=True, height=5), 40
    )
    rows = out.splitlines()
    assert rows[0].startswith("conv1 |=") and rows[0].rstrip().endswith("#")
    assert len(rows[0].rstrip()) <= 40 and "step" in rows[2]


def test_asciify() -> None:
    assert asciify("λ1_H — ◆ ξ η/B ✓ │") == "l1_H - * xi eta/B v |"
    assert asciify("☃").isascii()


def test_compare_table_fits_80_columns() -> None:
    s = {
        "lr": 0.05,
        "batch_size": 64,
        "momentum": 0.9,
        "lr_over_batch": 0.05 / 64,
        "break_even_step": 1250,
        "break_even_reason": "early-peak",
        "break_even_status": "tentative",
        "peak_lambda1_h": 23.9,
        "final_loss": 0.15,
    }
    runs = [(f"sgd lr={lr}", "red", s) for lr in (0.01, 0.05, 0.2)]
    out = render(compare_table(runs, 56), 56)
    assert all(len(ln) <= 56 for ln in out.splitlines())
    assert "◇ 1,250 pk" in out and "sgd lr=0.05" in out and "break-even" in out
    wide = render(compare_table(runs, 150), 150)
    assert "status" in wide and wide.count("◇ 1,250 pk") == 3


def test_compare_table_keeps_run_names_apart_when_it_cuts_them() -> None:
    """Eleven runs at 80 columns: each column has room for a few characters of a name, and
    names that differ only at the end (the setting they are named after) stay apart."""
    lrs = (0.05, 0.2, 0.1, 0.02, 0.5, 0.01, 0.3, 0.04, 0.06, 0.08, 0.15)
    runs = [(f"lr lr={lr}", "red", {"lr": lr}) for lr in lrs]
    out = render(compare_table(runs, 80), 80)
    header = out.splitlines()[0].split()
    assert len(header) == len(set(header)) == len(lrs), header  # before: 11 × "lr lr=…"
    assert all(h.endswith(str(lr)[1:]) for h, lr in zip(header, lrs, strict=True)), header
    many = [(f"resnet18 sgd momentum {lr}", "red", {}) for lr in lrs]
    wide = render(compare_table(many, 150), 150)
    assert all(f"momentum {lr}" in wide for lr in lrs)


def test_distinct_names() -> None:
    names = ["lr lr=0.05", "lr lr=0.2", "lr lr=0.1"]
    assert distinct_names(names, 8) == ["…lr=0.05", "…lr=0.2", "…lr=0.1"]
    assert distinct_names(names, 20) == names  # they fit
    long = ["resnet18 sgd lr=0.05 wd=5e-4 seed 1", "resnet18 sgd lr=0.2 wd=5e-4 seed 1"]
    got = distinct_names(long, 16)
    assert got == ["…0.05 wd=5e-4 s…", "…0.2 wd=5e-4 se…"] and all(len(n) <= 16 for n in got)
    assert distinct_names(["abc", "a very long name indeed"], 10) == ["abc", "a v…indeed"]
    assert distinct_names(["one long run name"], 10, ascii=True) == ["on... name"]


def test_run_list_and_event_log() -> None:
    row = RunRow(
        "sgd lr=0.2",
        "red",
        True,
        True,
        "stalled",
        "stalled 12s",
        "warning",
        1234,
        ["diverged @19", "gram disabled"],
        ["sharpness 3/9 (cap)"],
    )
    out = render(RunList([row]), 22)
    assert out.splitlines() == [
        "■ sgd lr=0.2",
        "  ◌ stalled 12s",
        "    step 1,234",
        "  ⚠ diverged @19",
        "  ⚠ gram disabled",
        "  sharpness 3/9 (cap)",
    ]
    assert render(RunList([row], ascii=True), 40).isascii()
    hung = RunRow(
        "sgd",
        "red",
        True,
        False,
        "stalled",
        "stalled 12s (no step since 149; agent alive)",
        "warning",
        149,
    )
    assert render(RunList([hung]), 24).splitlines() == [  # the run list is 24 wide
        "■ sgd",
        "  ◌ stalled 12s",
        "    no step since 149",
        "    agent alive",
        "    step 149",
    ]
    assert "agent alive)  step 149" in render(RunList([hung]), 80)
    log = EventLog([LogRow("error", 19, 2.0, "r", "red", "nan-loss: loss is nan at step 19")])
    text = render(log, 80)
    assert "error" in text and "19" in text and "+2s" in text and "nan-loss" in text
