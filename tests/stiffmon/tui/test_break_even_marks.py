"""One break-even mark per status in every view: the sharpness chart and its words, the
compare table and ``stiffmon summary`` all draw ``stiffmon.marks``' symbol (or its ASCII
fallback) for the same status, and each view shows the legend of the marks."""

from __future__ import annotations

import io
import math

import pytest
from rich.console import Console

from stiffmon import protocol as p
from stiffmon.marks import BREAK_EVEN_MARKS, CATAPULT, be_symbol, marks_legend
from stiffmon.store import Store
from stiffmon.summary import summary_table
from stiffmon.tui.app import StiffmonApp
from stiffmon.tui.renderables import LineChart
from stiffmon.tui.renderables.axes import asciify
from stiffmon.tui.views.sharpness import sharpness_chart
from tests.stiffmon.tui.test_app import screen_text

# λ1_H per measurement (every 20 steps), threshold 10
CONFIRMED = [1.0, 4.0, 8.0, 10.5, 10.6, 10.4, 10.5, 10.6, 10.5, 10.4, 10.6, 10.5]  # crosses, stays
TENTATIVE = [1.0, 4.0, 8.0, 10.5]  # at the threshold once: not sustained yet
DIVERGED = [1.0, 4.0, 8.0, 10.5]  # the same, then the loss is NaN
EXPECTED = {"conf": "confirmed", "tent": "tentative", "div": "diverged"}


def marks_store() -> Store:
    store = Store()
    for run, lam in (("conf", CONFIRMED), ("tent", TENTATIVE), ("div", DIVERGED)):
        store.apply(
            p.Hello(run=run, seq=0, step=0, t=0.0, name=run, optimizer={"type": "SGD", "lr": 0.2}),
            replay=True,
        )
        for i, v in enumerate(lam):
            values = {"loss": 1.0, "sharpness/lambda1_h": v, "sharpness/threshold": 10.0}
            store.apply(
                p.Scalars.from_dict(values, run=run, seq=i + 1, step=20 * i, t=float(i)),
                replay=True,
            )
        if run == "div":
            bad = {"loss": math.nan}
            store.apply(
                p.Scalars.from_dict(bad, run=run, seq=99, step=20 * len(lam), t=99.0), replay=True
            )
    return store


def test_the_store_has_one_run_of_each_status() -> None:
    store = marks_store()
    assert store.runs["conf"].break_even().status == "confirmed"
    assert store.runs["tent"].break_even().status == "tentative"
    div = store.runs["div"]
    assert div.break_even().status == "tentative" and div.diverged_step is not None


def test_marks_have_ascii_fallbacks_that_the_ascii_mode_uses() -> None:
    for mark in (*BREAK_EVEN_MARKS.values(), CATAPULT):
        assert mark.ascii.isascii() and not mark.symbol.isascii()
        assert asciify(mark.symbol) == mark.ascii  # ✕ was drawn as "?" in ASCII
    assert be_symbol("tentative", diverged=True) == "✕"
    assert be_symbol("tentative", diverged=True, ascii=True) == "x"
    assert be_symbol("something new") == BREAK_EVEN_MARKS["none"].symbol


@pytest.mark.parametrize("ascii", [False, True], ids=["unicode", "ascii"])
async def test_every_view_shows_the_same_symbol_for_the_same_status(ascii: bool) -> None:
    store = marks_store()
    want = {run: be_symbol(status, ascii=ascii) for run, status in EXPECTED.items()}
    assert len(set(want.values())) == 3
    app = StiffmonApp(store=store, clock=lambda: 0.0, ascii=ascii)
    async with app.run_test(size=(160, 45)) as pilot:
        await pilot.press("4")
        await pilot.pause()
        view = app.views["sharpness"]
        chart = sharpness_chart(view, compact=False)(120, 30)
        assert isinstance(chart, LineChart)
        color_of = {view.runs()[i].run: ln.color for i, ln in enumerate(chart.lines)}
        drawn = {
            run: [m.symbol for m in chart.markers if m.color == c and m.symbol != "▲"]
            for run, c in color_of.items()
        }
        fallback = asciify if ascii else str
        assert {run: fallback(s[0]) for run, s in drawn.items()} == want  # the chart's markers
        text = screen_text(app)
        for run, sym in want.items():  # the words under the chart
            assert f"{sym} {run}: " in text, (run, sym)
        assert marks_legend(ascii) in text  # its legend
        await pilot.press("6")
        await pilot.pause()
        text = screen_text(app)
        for sym in want.values():  # the compare table's BE cells (every run's at step 60)
            assert f"{sym} 60 thr" in text, sym
        assert marks_legend(ascii, none=False, catapult=False) in text  # its legend
        await pilot.press("1")
        await pilot.pause()
        assert marks_legend(ascii, none=False) in screen_text(app)  # the overview's chart
    out = io.StringIO()
    Console(file=out, width=120, color_system=None).print(summary_table(store))
    summary = out.getvalue()
    for sym in (be_symbol(s) for s in EXPECTED.values()):  # stiffmon summary
        assert f"{sym} " in summary
    assert marks_legend(none=False, catapult=False) in " ".join(summary.split())


def test_compare_cells_carry_the_status_mark() -> None:
    from stiffmon.tui.renderables.comparetable import be_cell

    s = {"break_even_step": 280, "break_even_reason": "early-peak"}
    assert be_cell(s | {"break_even_status": "confirmed"}) == "◆ 280 pk"
    assert be_cell(s | {"break_even_status": "tentative"}) == "◇ 280 pk"
    assert be_cell(s | {"break_even_status": "tentative", "diverged": True}) == "✕ 280 pk"
    assert be_cell(s | {"break_even_status": "tentative"}, ascii=True) == "o 280 pk"
    assert be_cell({"break_even_step": None, "break_even_status": "none"}) == "none yet"
