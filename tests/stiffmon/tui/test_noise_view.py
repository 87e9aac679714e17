"""The noise view says when a noise quantity is NaN at every measurement, rather than "yet"."""

from __future__ import annotations

import math

from stiffmon.store import Store
from stiffmon.tui.app import StiffmonApp
from stiffmon.tui.views.base import never
from tests.stiffmon.tui.test_app import feed, screen_text

NAN = math.nan
TESTS = {"noise/norm_test": NAN, "noise/inner_product_test": NAN, "noise/orthogonality_test": NAN}
SUGGESTED = {f"noise/suggested_batch/{k.removeprefix('noise/')}": NAN for k in TESTS}


async def test_noise_never_measured_says_why_not_yet() -> None:
    store = Store()
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(160, 45)) as pilot:
        feed(store, "a", range(3), now=0.0)
        await pilot.press("5")
        await pilot.pause(0.3)
        text = screen_text(app)  # before a Gram measurement they may still come
        assert "no noise scale B_simple yet" in text and "no gradient tests yet" in text
        # an InfoNCE-like run: every per-example gradient is zero, at every measurement
        noise = {
            "noise/trace_k": 0.0,
            "noise/grad_sq": 0.0,
            "noise/b_simple": NAN,
            **TESTS,
            **SUGGESTED,
        }
        feed(store, "a", [3, 6, 9], now=0.0, **noise)
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "live a: no noise scale B_simple: NaN at all 3 measurements (Tr K = 0" in text
        assert "live a: no gradient tests: NaN at all 3 measurements (Tr K = 0" in text
        assert "live a: no suggested batch: NaN at all 3 measurements (Tr K = 0" in text
        assert "B_simple yet" not in text and "gradient tests yet" not in text
        feed(store, "a", [12], now=0.0, **{**noise, "noise/b_simple": 40.0})
        await pilot.pause(0.3)
        assert "no noise scale B_simple" not in screen_text(app)  # one came: drawn


def test_the_cause_is_said_only_where_known() -> None:
    store = Store()
    feed(store, "a", [0, 1], now=0.0, **{"noise/trace_k": 2.0, "noise/grad_sq": -0.5,
                                         "noise/b_simple": NAN})  # fmt: skip
    rd = store.runs["a"]
    assert never(rd, ("noise/b_simple",), "noise scale B_simple") == (
        "no noise scale B_simple: NaN at all 2 measurements (‖G‖² ≤ 0 at every measurement: "
        "the mean gradient is within its noise)"
    )
    feed(store, "b", [0], now=0.0, **{"noise/trace_k": NAN, "noise/b_simple": NAN})
    rb = store.runs["b"]
    assert never(rb, ("noise/b_simple",), "x") == "no x: NaN at all 1 measurements"
    assert never(rb, ("noise/lambda1_k",), "x") is None  # not measured: may still come
    feed(store, "b", [1], now=0.0, **{"noise/b_simple": 3.0})
    assert never(rb, ("noise/b_simple",), "x") is None


async def test_a_nan_chart_keeps_its_title_and_waits_for_the_runs_that_may_still_send() -> None:
    store = Store()
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(160, 45)) as pilot:
        feed(store, "a", [0, 3], now=0.0, **{"noise/trace_k": 2.0, "noise/b_simple": NAN})
        feed(store, "b", [0, 3], now=0.0)  # no noise measurement yet: it may still come
        await pilot.press("5")
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "noise scale B_simple" in text  # the chart's title, above why it is empty
        assert "no noise scale B_simple yet" in text  # run b
        assert "live a: no noise scale B_simple: NaN at all 2 measurements" in text
        assert "Tr K = 0" not in text  # Tr K was measured and not zero: no cause to give
        feed(store, "b", [6], now=0.0, **{"noise/b_simple": 12.0})
        await pilot.pause(0.3)
        assert "NaN at all" not in screen_text(app)  # b's line is drawn; a's has no line
