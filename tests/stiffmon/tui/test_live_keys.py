"""A replay-only key pressed on live runs says so, rather than doing nothing without a word."""

from __future__ import annotations

from stiffmon.store import Store
from stiffmon.tui.app import StiffmonApp
from tests.stiffmon.timeline import FakeAgent
from tests.stiffmon.tui.test_app import notified


async def test_speed_keys_on_live_runs_say_why_nothing_changes() -> None:
    store = Store()
    agent = FakeAgent(store, "a")
    agent.steps(0.05 * (k + 1) for k in range(20))
    agent.advance(1.0)
    app = StiffmonApp(store=store, clock=lambda: agent.now)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        await pilot.press("plus")
        assert await notified(app, pilot, "set a replay's speed")
        assert app.replay is None
