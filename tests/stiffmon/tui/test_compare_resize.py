"""The compare table follows the terminal's size: a resize redraws it at once, with no new data
(a finished replay, a paused monitor) and no Ctrl+L."""

from __future__ import annotations

from pathlib import Path

from stiffmon.tui.app import StiffmonApp
from stiffmon.tui.sources import ReplaySource
from tests.stiffmon.tui.fixtures import write_sessions
from tests.stiffmon.tui.test_app import screen_text


async def test_compare_table_redraws_on_resize(tmp_path: Path) -> None:
    src = ReplaySource(write_sessions(tmp_path, lrs=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5)))
    src.load()
    app = StiffmonApp(replay=src, clock=lambda: 0.0, screenshot_dir=tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await pilot.press("6")
        await pilot.pause()
        narrow = screen_text(app)
        assert "not shown (no room): runs" in narrow  # six runs do not fit in 80 columns
        version = app.store.version
        await pilot.resize_terminal(200, 50)
        for _ in range(10):
            await pilot.pause(0.05)
        assert app.store.version == version  # no new data came: only the resize redrew it
        wide = screen_text(app)
        assert "not shown (no room)" not in wide
        assert all(f"sgd lr={lr}" in wide for lr in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5))
        table = app.query_one("#compare-table")
        assert table.size.width > 100  # the table takes the new width, not the old one
        await pilot.resize_terminal(80, 24)
        for _ in range(10):
            await pilot.pause(0.05)
        again = screen_text(app)
        assert "not shown (no room): runs" in again
        assert app.query_one("#compare-table").size.width <= 80
