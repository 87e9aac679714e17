"""A run whose scalar is NaN at every measurement: every chart of it says so, not "yet"."""

from __future__ import annotations

import math

from stiffmon.store import Store
from stiffmon.tui.app import StiffmonApp
from tests.stiffmon.tui.test_app import feed, screen_text

NAN = math.nan


async def test_all_nan_sharpness_and_stiffness_say_why_in_every_view() -> None:
    store = Store()
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    nan = {"sharpness/lambda1_h": NAN, "stiffness/cos/train-train/within": NAN}
    async with app.run_test(size=(160, 45)) as pilot:
        feed(store, "a", [0, 4, 8], now=0.0, **nan, **{"noise/trace_k": 0.0})
        await pilot.press("1")
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "live a: no λ1_H: NaN at all 3 measurements" in text
        assert "no sharpness measurement yet" not in text
        # stiffness comes from the Gram, whose Tr K = 0 says why
        assert "live a: no within-class stiffness: NaN at all 3 measurements" in text
        assert "per-example gradients are zero" in text
        assert "no within-class stiffness yet" not in text
        await pilot.press("4")
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "λ1_H per run" in text  # the chart, titled, says why it has no line
        assert "live a: no λ1_H: NaN at all 3 measurements" in text
        assert "per-example gradients" not in text  # not a Gram quantity: no Gram cause
        feed(store, "a", [12], now=0.0, **{"sharpness/lambda1_h": 7.5})
        await pilot.pause(0.3)
        assert "NaN at all" not in screen_text(app)  # one finite value: drawn


async def test_all_nan_accuracy_says_why() -> None:
    store = Store()
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(160, 45)) as pilot:
        feed(store, "a", [0, 1], now=0.0, accuracy=NAN)
        await pilot.press("7")
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "live a: no accuracy (train batch): NaN at all 2 measurements" in text
        assert "no accuracy (train batch) yet" not in text
