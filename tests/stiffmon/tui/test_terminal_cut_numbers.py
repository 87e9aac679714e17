"""Narrow terminals: a line too long is cut, but never in the middle of a number (``step 1,4…``
for 1,492, ``break-even 8…`` for 80 read as other numbers)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console
from rich.text import Text

from stiffmon.tui.renderables.axes import cut_at_words
from stiffmon.tui.renderables.runlist import RunList, RunRow
from tests.stiffmon.tui.test_app import replay_app

HALF_NUMBER = re.compile(r"\d(…|\.\.\.)")
"""A digit right before the ellipsis: a number cut short."""


def _lines(app: object, selector: str) -> list[str]:
    w = app.query_one(selector)  # type: ignore[attr-defined]
    return [w.render_line(y).text.rstrip() for y in range(w.size.height)]


def test_cut_at_words_keeps_numbers_whole() -> None:
    t = Text("◆ sgd lr=0.2: break-even 80 (catapult) λ1_H 16.1")
    assert cut_at_words(t, 30).plain == "◆ sgd lr=0.2: break-even 80 …"
    assert cut_at_words(t, 29).plain == "◆ sgd lr=0.2: break-even 80 …"
    assert cut_at_words(t, 28).plain == "◆ sgd lr=0.2: break-even…"
    assert cut_at_words(t, 27).plain == "◆ sgd lr=0.2: break-even…"
    assert cut_at_words(t, 27, ascii=True).plain == "◆ sgd lr=0.2: break-even..."
    assert cut_at_words(t, 0) is t and cut_at_words(t, 80) is t


@pytest.mark.parametrize("size", [(45, 30), (60, 20), (52, 24)])
async def test_no_number_is_cut_in_half_on_a_narrow_screen(
    tmp_path: Path, size: tuple[int, int]
) -> None:
    app = replay_app(tmp_path)
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        steps = {f"{rd.last_step:,}" for rd in app.store.runs.values()}
        runs = _lines(app, "#runs")
        shown = [m for ln in runs for m in re.findall(r"(?:step )?(\d[\d,]*)\S*$", ln.strip())]
        assert not [ln for ln in runs if HALF_NUMBER.search(ln)], runs
        assert steps <= set(shown), (steps, runs)
        health = _lines(app, "#overview-health")
        assert not [ln for ln in health if HALF_NUMBER.search(ln)], health
        await pilot.press("4")
        await pilot.pause()
        why = _lines(app, "#sharpness-why")
        assert any("break-even" in ln for ln in why), why
        assert not [ln for ln in why if HALF_NUMBER.search(ln)], why


@pytest.mark.parametrize("width", [9, 11, 13, 15, 20])
def test_the_run_list_shows_the_step_whole(width: int) -> None:
    row = RunRow("sgd lr=0.05", "red", True, False, "live", "live", "ok", 1_492)
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    for t in RunList([row], ascii=True).full(row, width):
        console.print(t, no_wrap=True, overflow=t.overflow or "crop")
    lines = console.export_text().splitlines()  # as drawn: cut where too long
    assert any(re.search(r"(^|\s)1,492$", ln) for ln in lines), lines  # not "step 1,4"
    assert not [ln for ln in lines if HALF_NUMBER.search(ln)], lines
