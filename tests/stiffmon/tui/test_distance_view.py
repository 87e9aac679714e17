"""The distance view says when a run gets no stiffness-vs-distance curve, rather than "yet"."""

from __future__ import annotations

import numpy as np

from stiffmon import protocol as p
from stiffmon.store import Store
from stiffmon.tui.app import StiffmonApp
from tests.stiffmon.tui.test_app import _event, feed, screen_text

CLASSES = ("0", "1")


def gram(store: Store, run: str, step: int, curve: bool = False) -> None:
    """One Gram measurement as the agent sends it: matrix, curve (only for one float tensor of
    probe inputs), then the measurement's scalars."""
    store.apply(
        p.Matrix(
            run=run,
            seq=500 + step,
            step=step,
            t=100.0 + step,
            name="stiffness/cos/train-train",
            data=np.eye(2),
            row_labels=CLASSES,
            col_labels=CLASSES,
        ),
        now=0.0,
    )
    if curve:
        x = np.linspace(0.05, 1.95, 20)
        store.apply(
            p.Curve(
                run=run,
                seq=600 + step,
                step=step,
                t=100.0 + step,
                name="stiffness-distance/input",
                x=x,
                y=0.5 - x / 2,
                attrs={"xi": 1.0},
            ),
            now=0.0,
        )
    extra = {"stiffness/cos/train-train/within": 1.0, "layer-stiffness/fc": 0.3}
    if curve:
        extra["xi/input"] = 1.0
    feed(store, run, [step], now=0.0, **extra)


async def test_a_run_without_curves_is_said_not_awaited() -> None:
    store = Store()
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(120, 30)) as pilot:
        feed(store, "a", range(3), now=0.0)
        await pilot.press("3")
        await pilot.pause(0.3)
        text = screen_text(app)  # before a Gram measurement a curve may still come
        assert "no stiffness-vs-distance curve yet" in text and "no ξ yet" in text
        gram(store, "a", 3)  # token ids as probe inputs: a measurement without a curve
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "live a: no stiffness-vs-distance curve is made for this run" in text  # wrapped
        assert "no ξ for this run" in text and "yet" not in text
        why = (
            "no stiffness-vs-distance curve: the probe inputs are not one float tensor (pass "
            "distance_layers=[...] for curves in a layer's activation space)"
        )
        store.apply(_event("a", 0, "no-distance-curve", why, "info"), now=0.0)
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "live a: no stiffness-vs-distance curve: the probe inputs" in text  # wrapped
        assert "curve is made for this run" not in text and "yet" not in text


async def test_the_agents_reason_is_shown_before_any_measurement_and_curves_still_drawn() -> None:
    store = Store()
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(120, 30)) as pilot:
        feed(store, "a", range(3), now=0.0)
        store.apply(_event("a", 0, "no-distance-curve", "no curve: token ids", "info"), now=0.0)
        await pilot.press("3")
        await pilot.pause(0.3)
        assert "live a: no curve: token ids" in screen_text(app)
        feed(store, "b", range(3), now=0.0)
        gram(store, "b", 3, curve=True)
        await pilot.press("right_square_bracket")  # the next run
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "live b: stiffness vs distance at step 3" in text
        assert "no stiffness-vs-distance curve" not in text and "no ξ" not in text
