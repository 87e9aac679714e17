"""Terminals that show less: no colour (``NO_COLOR``), no Unicode drawing (``TERM=vt100``),
fewer than 80×24 cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stiffmon.tui.renderables import Heatmap, StepHeatmap, glyph_scale
from stiffmon.tui.terminal import ascii_mode, ascii_terminal
from stiffmon.tui.views import ChartView
from tests.stiffmon.tui.test_app import replay_app, screen_text
from tests.stiffmon.tui.test_renderables import render


def test_without_colour_the_heatmap_cells_carry_the_sign() -> None:
    m = np.array([[0.69, -0.27, 0.0], [-0.9, 0.3, np.nan]])
    out = render(Heatmap(m, cell_width=3, color=False), 40).splitlines()
    assert out[1:3] == ["0 ###---···", "1 ===+++???"]  # one row per line: no half blocks
    assert out[3].strip() == glyph_scale(width=38) == "-1 = -.6 - -.2 · +.2 + +.6 # +1"
    assert glyph_scale() == "-1 =  -.6  -  -.2  ·  +.2  +  +.6  #  +1"  # where it fits
    wide = render(Heatmap(m, cell_width=7, color=False, half_block=False, values=True), 60)
    assert "+0.69" in wide and "-0.27" in wide and "+0.00" in wide  # the value, sign and all
    layers = render(StepHeatmap(m, ["conv", "fc"], [0, 10, 20], color=False, height=8), 80)
    assert "conv │####----····" in layers and "  fc │====++++????" in layers
    assert glyph_scale() + "  mean cosine stiffness" in layers and "█" not in layers
    assert "▀" not in "".join(out) and "█" not in "".join(out)


async def test_no_color_draws_the_heatmaps_in_glyphs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    app = replay_app(tmp_path)
    assert app.no_color
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("2")
        await pilot.pause()
        text = screen_text(app)
        assert glyph_scale() in text and "▀" not in text
        heatmap = app.query_one("#heatmap", ChartView)
        cells = "".join(heatmap.render_line(y).text for y in range(4, 8))
        assert set(cells) & set("=-+#·")  # the sign is in the characters
        await pilot.press("8")
        await pilot.pause()
        assert glyph_scale() in screen_text(app)


@pytest.mark.parametrize(
    ("environ", "ascii"),
    [
        ({"TERM": "vt100"}, True),
        ({"TERM": "vt220"}, True),
        ({"TERM": "linux"}, True),
        ({"TERM": "linux-16color"}, True),
        ({"TERM": "screen.linux"}, True),
        ({"TERM": "dumb"}, True),
        ({"TERM": "xterm-256color"}, False),
        ({"TERM": "tmux-256color"}, False),
        ({"TERM": "screen.xterm-256color"}, False),
        ({}, False),
        ({"TERM": "vt100", "STIFFMON_ASCII": "0"}, False),
        ({"TERM": "xterm", "STIFFMON_ASCII": "1"}, True),
    ],
)
def test_which_terminals_get_ascii(environ: dict[str, str], ascii: bool) -> None:
    assert ascii_terminal(environ) is ascii
    assert ascii_mode(False, environ) is ascii
    assert ascii_mode(True, environ) is True  # --ascii wins


async def test_a_vt100_gets_ascii_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TERM", "vt100")
    assert replay_app(tmp_path, shoot_views=True).ascii is False  # SVGs: no terminal to fit
    app = replay_app(tmp_path)
    assert app.ascii
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("4")
        await pilot.pause()
        bad = sorted({ch for ch in screen_text(app) if not ch.isascii()})
        assert not bad


async def test_the_log_keeps_its_text_readable_at_60x20(tmp_path: Path) -> None:
    app = replay_app(tmp_path)
    async with app.run_test(size=(60, 20)) as pilot:
        await pilot.press("g")
        await pilot.pause()
        runs = app.query_one("#runs")
        assert runs.size.width < 24  # a narrower run list leaves the view more room
        log = app.query_one("#log-table", ChartView)
        lines = [log.render_line(y).text.rstrip() for y in range(log.size.height)]
        assert any("run appeared" in ln for ln in lines), lines  # not folded into a column
        assert max(len(ln.strip()) for ln in lines) > 30
