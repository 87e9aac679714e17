"""The overview's health lines and the sharpness view's break-even words have a few lines of
room: runs past them are counted and named on the last line, never dropped without a word."""

from __future__ import annotations

from stiffmon.store import Store
from stiffmon.tui.app import StiffmonApp
from tests.stiffmon.tui.test_app import feed, screen_text

RUNS = [f"r{i}" for i in range(8)]  # shown as "live r0" … "live r7"


async def test_the_sharpness_words_of_eight_runs_name_those_that_do_not_fit() -> None:
    store = Store()
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(120, 40)) as pilot:
        for i, run in enumerate(RUNS):
            feed(store, run, range(5), now=0.0, **{"sharpness/lambda1_h": 1.0 + i})
        await pilot.press("4")
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "live r0: no break-even yet" in text
        # legend + 4 runs + the count: r4 … r7 named there
        assert "+4 more runs (their break-even: view 6): live r4, live r5, live r6, live r7" in text


async def test_the_health_lines_of_eight_diverged_runs_name_those_that_do_not_fit() -> None:
    store = Store()
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(120, 40)) as pilot:
        for run in RUNS:
            feed(store, run, range(5), now=0.0)
            feed(store, run, [5], now=0.0, loss=float("nan"))
        await pilot.press("1")
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "live r0: diverged at step 5" in text
        assert "+4 more runs with problems: live r4, live r5, live r6, live r7" in text
