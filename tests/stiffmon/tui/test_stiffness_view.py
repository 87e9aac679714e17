"""The stiffness view says why class stiffness never comes, rather than "yet"."""

from __future__ import annotations

from stiffmon.store import Store
from stiffmon.tui.app import StiffmonApp
from tests.stiffmon.tui.test_app import _event, feed, screen_text


async def test_a_probe_without_class_labels_is_said_not_awaited() -> None:
    store = Store()
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(120, 30)) as pilot:
        feed(store, "a", range(3), now=0.0)
        await pilot.press("2")
        await pilot.pause(0.3)
        assert "no cos stiffness for train-train yet" in screen_text(app)  # it may still come
        why = "no class stiffness: the probe's targets are not integer class labels of shape (N,)"
        store.apply(_event("a", 0, "no-class-labels", why, "info"), now=0.0)
        await pilot.pause(0.3)
        text = screen_text(app)
        assert why in text and "yet" not in text
