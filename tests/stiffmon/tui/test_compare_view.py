"""The live compare table (view 6) follows a schedule: η and β of the last step, not the ones
in force at the last heavy measurement (its row is otherwise redone only when one arrives)."""

from __future__ import annotations

from stiffmon.store import Store
from stiffmon.tui.app import StiffmonApp
from tests.stiffmon.tui.test_app import feed, screen_text


async def test_compare_table_shows_the_last_steps_lr_and_momentum() -> None:
    store = Store()
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(160, 40)) as pilot:
        feed(store, "a", [0], now=0.0, **{"sharpness/lambda1_h": 3.0, "lr/0": 0.0123})
        feed(store, "a", range(1, 10), now=0.0, **{"lr/0": 0.0123, "momentum/0": 0.93})
        await pilot.press("6")
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "0.0123" in text and "0.93" in text
        feed(store, "a", range(10, 20), now=0.0, **{"lr/0": 0.0456, "momentum/0": 0.77})
        await pilot.pause(0.3)  # no new measurement: only per-step columns moved
        text = screen_text(app)
        assert "0.0456" in text and "0.77" in text
        assert "0.0123" not in text and "0.93" not in text
