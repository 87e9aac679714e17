"""A stability threshold that an lr schedule moves: the sharpness chart draws it as a step line
at the value of each measurement (not one flat line at the last), the overview's λ1_H chart
keeps to λ1_H, and the compare table says which measurement its threshold belongs to."""

from __future__ import annotations

import io
import re
from dataclasses import replace

import numpy as np
import pytest
from rich.console import Console
from rich.segment import Segment

from stiffmon.store import Store
from stiffmon.tui.app import StiffmonApp
from stiffmon.tui.renderables import HLine, Line, LineChart, StepLine
from stiffmon.tui.renderables.comparetable import legend_text
from stiffmon.tui.renderables.raster import row_of
from stiffmon.tui.views.sharpness import sharpness_chart
from tests.stiffmon.tui.test_app import feed, screen_text
from tests.stiffmon.tui.test_compare_view import screen_rows

# OneCycleLR as recorded by a user: η rises then anneals, so (2+2β)/η falls then rises
THRESHOLDS = [325.0, 19.3, 12.5, 16.0, 29.9, 118.5]  # at steps 0, 10, …, 50
LAMBDA1 = [1.0, 5.0, 39.9, 8.0, 2.0, 1.7]
LRS = [6e-3, 0.1, 0.155, 0.12, 0.065, 0.0165]


def onecycle_store(first_threshold: float = THRESHOLDS[0], adam: bool = False) -> Store:
    """One SGD run measured every 10 steps up to step 50, trained to step 59; with ``adam``
    an Adam run too, whose preconditioned λ1 is two orders above its λ1_H."""
    store = Store()
    for s in range(60):
        extra: dict[str, float] = {"lr/0": LRS[s // 10] if s <= 50 else 1.2e-6}
        if s % 10 == 0:
            i = s // 10
            thr = first_threshold if i == 0 else THRESHOLDS[i]
            extra |= {"sharpness/lambda1_h": LAMBDA1[i], "sharpness/threshold": thr}
        feed(store, "sgd", [s], now=0.0, **extra)
        if adam and s % 10 == 0:
            feed(
                store,
                "adam",
                [s],
                now=0.0,
                **{
                    "sharpness/lambda1_h": 1.0 + s / 10,
                    "sharpness/lambda1_precond": 100.0 + 1.5 * s,
                    "sharpness/threshold_precond": 6000.0,
                },
            )
    return store


def chart_rows(chart: LineChart, width: int, height: int) -> list[str]:
    """The chart's text, one string per row."""
    text = "".join(s.text for s in chart.render_lines(width, height) if isinstance(s, Segment))
    return text.split("\n")


def dash_rows(rows: list[str], col: int) -> list[int]:
    """The plot rows (0 at the top, under the title) that have a dash at column ``col``."""
    return [r for r, row in enumerate(rows) if col < len(row) and row[col] == "╌"]


async def sharpness_of(store: Store, compact: bool) -> LineChart:
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(160, 45)) as pilot:
        await pilot.press("4")
        await pilot.pause()
        chart = sharpness_chart(app.views["sharpness"], compact=compact)(120, 30)
    assert isinstance(chart, LineChart)
    return chart


async def test_the_threshold_is_drawn_at_each_measurements_value() -> None:
    chart = await sharpness_of(onecycle_store(), compact=False)
    rows = chart_rows(chart, 120, 30)
    assert chart.plot_box is not None and chart.steplines
    left, pw, x0, x1 = chart.plot_box
    y0, y1 = chart._bounds()[2:]  # type: ignore[index]
    assert 29.9 <= y1 < 80  # the thresholds near λ1 are in range, 118.5 and 325 are not
    plot_rows = len(rows) - 1 - 3  # the trailing newline, the title, the x axis and its labels

    def col(step: float) -> int:
        return left + round((step - x0) / (x1 - x0) * (pw - 1))

    seen = {}
    for i, thr in enumerate(THRESHOLDS[1:5], start=1):  # mid-interval: no other dash there
        want = 1 + row_of(thr, y0, y1, plot_rows)  # under the title
        got = sorted(
            {r for c in range(col(10 * i + 2), col(10 * i + 8)) for r in dash_rows(rows, c)}
        )
        assert got == [want], (thr, got, want)
        seen[thr] = want
    assert seen[12.5] > seen[16.0] > seen[19.3] > seen[29.9]  # lower threshold, lower row
    text = "\n".join(rows)
    assert "↑thr 325" in text and re.search("↑thr 11[89]", text)  # the parts above, named
    # λ1_H 39.9 at step 20 is above the threshold of that step (12.5), which the chart shows
    r_lam = 1 + row_of(39.9, y0, y1, plot_rows)
    assert r_lam < seen[12.5]


async def test_a_huge_warm_up_threshold_does_not_squash_the_chart() -> None:
    chart = await sharpness_of(onecycle_store(first_threshold=3.2e8), compact=False)
    y1 = chart._bounds()[3]  # type: ignore[index]
    assert y1 < 80
    assert "↑thr 3e8" in "\n".join(chart_rows(chart, 120, 30))


def test_a_constant_threshold_looks_like_the_flat_line_it_was() -> None:
    x = np.arange(0.0, 60.0, 10.0)
    line = Line(x, np.array([1.0, 3.0, 6.0, 8.0, 9.0, 9.5]), "red", "a")
    kw = {"title": "λ1_H", "height": 16}
    flat = LineChart([line], hlines=[HLine(10.0, "red", "thr", x_end=55.0)], **kw)  # type: ignore[arg-type]
    step = LineChart(
        [line],
        steplines=[StepLine(x, np.full(6, 10.0), "red", "thr", x_end=55.0)],
        **kw,  # type: ignore[arg-type]
    )
    assert chart_rows(step, 60, 16) == chart_rows(flat, 60, 16)
    above = LineChart(
        [line],
        steplines=[StepLine(x, np.full(6, 500.0), "red", "thr", x_end=55.0)],
        **kw,  # type: ignore[arg-type]
    )
    flat_above = LineChart([line], hlines=[HLine(500.0, "red", "thr", x_end=55.0)], **kw)  # type: ignore[arg-type]
    rows = chart_rows(above, 60, 16)
    assert rows == chart_rows(flat_above, 60, 16)  # named near the top right, as it was
    assert "↑thr 500" in "\n".join(rows)


async def test_overview_sharpness_chart_draws_raw_lambda1_h_only() -> None:
    store = onecycle_store(adam=True)
    overview = await sharpness_of(store, compact=True)
    assert [ln.label for ln in overview.lines] == ["live sgd", "live adam"]
    assert max(float(np.nanmax(ln.y)) for ln in overview.lines) < 50  # no λ1(P⁻¹H) ~100–185
    assert len(overview.steplines) == 1  # the SGD run's; the preconditioned 6000 is not there
    full = await sharpness_of(store, compact=False)  # view 4 keeps it, labelled
    assert "live adam precond" in [ln.label for ln in full.lines]
    assert full.title.startswith("λ1_H and precond λ1(P⁻¹H) per run")


@pytest.mark.parametrize("size", [(160, 40), (80, 24)], ids=["rows", "columns"])
async def test_compare_names_the_step_of_its_threshold(size: tuple[int, int]) -> None:
    """η is the last step's (1.2e-6 at the end of the cycle); thr is the last measurement's,
    computed from η at step 50: the cell says ``119@50`` and the legend what that means."""
    app = StiffmonApp(store=onecycle_store(), clock=lambda: 0.0)
    async with app.run_test(size=size) as pilot:
        await pilot.press("6")
        await pilot.pause(0.3)
        rows = screen_rows(app)
    text = "\n".join(rows)
    assert "1.2e-6" in text
    assert re.search(r"11[89]@50\b", text), text
    if size[0] >= 118:
        assert "@S: from the η, β of that step S" in text
    assert "thr its stability threshold at the last λ1 measurement" in legend_text()


async def test_compare_threshold_without_a_step_when_eta_did_not_move() -> None:
    """A constant η: the last measurement's threshold is the one of the η shown, no ``@S``."""
    store = Store()
    for s in range(60):
        extra = {"lr/0": 0.1, "momentum/0": 0.9}
        if s % 10 == 0:
            extra |= {"sharpness/lambda1_h": 1.0 + s / 10, "sharpness/threshold": 38.0}
        feed(store, "sgd", [s], now=0.0, **extra)
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("6")
        await pilot.pause(0.3)
        thr = next(r for r in screen_rows(app) if re.search(r"│thr\s", r))
    assert re.search(r"\b38$", thr.rstrip()) and "@" not in thr, thr


async def test_the_words_and_the_cursor_give_the_threshold_of_their_step() -> None:
    """The catapult at step 20 is judged against that step's threshold (12.5), not the last
    one (118.5): the words say both, and the cursor reads the threshold held at its step."""
    app = StiffmonApp(store=onecycle_store(), clock=lambda: 0.0)
    async with app.run_test(size=(160, 45)) as pilot:
        await pilot.press("4")
        await pilot.pause()
        text = screen_text(app)
        assert re.search(r"λ1_H 39.9, threshold 12.5 there; now 11[89]", text), text
        app.set_cursor(25.0)
        chart = sharpness_chart(app.views["sharpness"], compact=False)(120, 30)
    assert isinstance(chart, LineChart)
    readout = chart_rows(chart, 120, 30)[1]
    assert readout.startswith("step 25:") and "■ 39.9" in readout and "╌ 12.5" in readout
    # past the last measurement: the last threshold is held up to the run's end (step 59)
    assert "╌ 118" in chart_rows(replace(chart, cursor_x=55.0), 120, 30)[1]


def test_a_step_line_holds_each_value_up_to_the_next_and_none_past_its_end() -> None:
    sl = StepLine(np.array([0.0, 10.0]), np.array([5.0, 7.0]), "red", "thr", x_end=15.0)
    assert [sl.value_at(x) for x in (0.0, 9.0, 10.0, 15.0)] == [5.0, 5.0, 7.0, 7.0]
    assert np.isnan(sl.value_at(-1.0)) and np.isnan(sl.value_at(16.0))


def step_chart(ascii: bool = False) -> list[str]:
    """A threshold stepping down from 8 to 2 at x 30 and up to 6 at x 70, drawn with a Console
    (the data line stays under the steps, so no curve covers a riser)."""
    chart = LineChart(
        [Line(np.array([0.0, 100.0]), np.array([0.0, 0.0]), "blue")],
        steplines=[StepLine(np.array([0.0, 30.0, 70.0]), np.array([8.0, 2.0, 6.0]), "red", "thr")],
        y_range=(0.0, 9.0),
        ascii=ascii,
        height=16,
    )
    console = Console(width=60, height=16, color_system=None, record=True, file=io.StringIO())
    console.print(chart)
    return console.export_text().splitlines()


def riser(rows: list[str], top: str, bottom: str, middle: str) -> tuple[int, int, int]:
    """(column, top row, bottom row) of the one riser from the corner ``top`` down to the
    corner ``bottom`` in one column, every row between them ``middle``."""
    for c in range(max(map(len, rows))):
        col = [r[c] if c < len(r) else " " for r in rows]
        if top in col and bottom in col[col.index(top) + 1 :]:
            r0 = col.index(top)
            r1 = col.index(bottom, r0 + 1)
            if r1 - r0 >= 2 and all(ch == middle for ch in col[r0 + 1 : r1]):
                return c, r0, r1
    raise AssertionError(f"no riser {top}{middle}{bottom}:\n" + "\n".join(rows))


def test_a_step_line_is_joined_by_dashed_risers_where_its_value_moves() -> None:
    rows = step_chart()
    c, hi, lo = riser(rows, "┐", "└", "╎")  # 8 → 2 at x 30: down
    assert rows[hi][c - 1] == "╌" and rows[lo][c + 1] == "╌"  # the levels reach the corners
    c2, mid, lo2 = riser(rows, "┌", "┘", "╎")  # 2 → 6 at x 70: up, from the low level
    assert lo2 == lo and c2 > c + 10 and hi < mid < lo
    assert rows[mid][c2 + 1] == "╌" and rows[lo][c2 - 1] == "╌"
    # each level is one row, not several segments: no dash of the line off its three rows
    for r, row in enumerate(rows[:-2]):
        if r not in (hi, mid, lo):
            assert "╌" not in row[c + 2 :], (r, row)


def test_a_step_lines_risers_in_ascii() -> None:
    rows = step_chart(ascii=True)
    assert all(row.isascii() for row in rows)
    c, hi, lo = riser(rows, "+", "+", "|")
    assert rows[hi][c - 1] == "-" and rows[lo][c + 1] == "-"
    riser([r[c + 1 :] for r in rows], "+", "+", "|")  # and the second one, further right


def test_the_value_held_at_a_riser_is_the_new_one() -> None:
    sl = StepLine(np.array([0.0, 30.0, 70.0]), np.array([8.0, 2.0, 6.0]), "red", "thr")
    assert [sl.value_at(x) for x in (29.9, 30.0, 69.0, 70.0, 1e9)] == [8.0, 2.0, 2.0, 6.0, 6.0]
