"""A 24-run learning-rate sweep on a screen where the compare table has room for a few runs:
the table shows the page of runs that holds the selected one, so ``[`` / ``]`` reach every run
(before, runs past the first page were only named in the note, their numbers never shown)."""

from __future__ import annotations

import re

import numpy as np

from stiffmon.store import Store
from stiffmon.summary import fmt
from stiffmon.tui.app import StiffmonApp
from tests.stiffmon.tui.fixtures import run_messages
from tests.stiffmon.tui.test_app import screen_text

LRS = [float(f"{lr:.4g}") for lr in np.geomspace(0.003, 12, 24)]


def sweep_store() -> Store:
    store = Store()
    for i, lr in enumerate(LRS):
        for m in run_messages(lr, f"run{i:02d}", i, steps=120, every=20):
            store.apply(m, replay=True)
    return store


def test_the_page_holds_the_selected_run() -> None:
    from stiffmon.tui.renderables.comparetable import first_shown

    assert first_shown(24, 24, 17) == 0
    assert [first_shown(24, 5, s) for s in (0, 4, 5, 9, 10, 19, 20, 23)] == [
        0,
        0,
        5,
        5,
        10,
        15,
        19,  # the last page ends at the last run: full
        19,
    ]


async def test_every_run_of_a_sweep_is_reachable_in_a_narrow_compare_table() -> None:
    store = sweep_store()
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("6")
        await pilot.pause()
        assert "not shown (no room): runs" in screen_text(app)  # 24 runs do not fit in 100
        for i, lr in enumerate(LRS):
            app.selected = i
            app.redraw(force=True)
            await pilot.pause()
            text = screen_text(app)
            table = text.split("not shown (no room)", 1)[0]
            eta = fmt(lr, ".3g")
            head = table.split("η/B", 1)[0]  # the run names and the η row
            assert re.search(rf"(?<![0-9.]){re.escape(eta)}(?![0-9])", head), (i, eta, head)
