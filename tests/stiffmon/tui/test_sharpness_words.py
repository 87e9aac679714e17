"""The words under the sharpness chart: a catapult named once, the threshold rule shown."""

from __future__ import annotations

import numpy as np

from stiffmon import protocol as p
from stiffmon.store import Store
from stiffmon.tui.app import StiffmonApp
from stiffmon.tui.views.sharpness import be_words
from tests.stiffmon.tui.test_app import screen_text


def test_catapult_marker_is_not_repeated_as_an_extra_catapult() -> None:
    store = Store()
    lam = [1.0, 2.0, 4.0, 16.0, 5.0, 5.5, 5.2, 5.4, 5.1, 5.3]
    for i, v in enumerate(lam):
        store.apply(
            p.Scalars.from_dict(
                {"sharpness/lambda1_h": v, "sharpness/threshold": 10.0},
                run="r",
                seq=i,
                step=20 * i,
                t=float(i),
            ),
            replay=True,
        )
    rd = store.runs["r"]
    be = rd.break_even()
    assert be.reason == "catapult" and be.step == 60 and be.catapults == (60,)
    words = be_words(rd)
    assert words.startswith("break-even 60 (") and "catapult" in words
    assert "catapult at" not in words  # the marker already says it


def test_no_break_even_yet_while_running_and_none_once_finished() -> None:
    store = Store()
    for i in range(6):  # still rising
        store.apply(
            p.Scalars.from_dict(
                {"sharpness/lambda1_h": 1.0 + i, "sharpness/threshold": 100.0},
                run="r",
                seq=i,
                step=10 * i,
                t=float(i),
            ),
            replay=True,
        )
    rd = store.runs["r"]
    assert be_words(rd) == "no break-even yet"
    store.apply(p.Bye(run="r", seq=6, step=50, t=6.0, reason="closed"), replay=True)
    assert be_words(rd) == "no break-even"
    store.apply(
        p.Scalars.from_dict({"loss": float("nan")}, run="r", seq=7, step=3, t=7.0), replay=True
    )
    assert be_words(rd) == "no break-even; ⚠ diverged at step 3"


def _sharp_run(store: Store, run: str, rule: str, precond_rule: str | None = None) -> None:
    for i in range(4):
        store.apply(
            p.Scalars.from_dict(
                {"sharpness/lambda1_h": 1.0 + i, "sharpness/threshold": 18.0},
                run=run,
                seq=2 * i,
                step=10 * i,
                t=float(i),
            ),
            replay=True,
        )
        for name, r in (("hessian", rule), ("hessian-precond", precond_rule)):
            if r is None:
                continue
            store.apply(
                p.Spectrum(
                    run=run,
                    seq=2 * i + 1,
                    step=10 * i,
                    t=float(i),
                    name=name,
                    values=np.array([1.0 + i, 0.5]),
                    attrs={"threshold_rule": r, "hvps": 5},
                ),
                replay=True,
            )


async def test_the_threshold_rule_is_shown_in_the_title_and_per_run() -> None:
    store = Store()
    _sharp_run(store, "a", "2/η - wd (SGD, group 1)")
    _sharp_run(store, "b", "2/η - wd (SGD, group 0)", "(2+2β1)/((1-β1)η) (AdamW, group 0)")
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(160, 45)) as pilot:
        await pilot.press("4")
        await pilot.pause()
        text = screen_text(app)
        assert "stability threshold 2/η - wd" in text
        assert "threshold 18 (SGD, group 1)" in text  # its value; the formula is in the title
        assert "preconditioned (2+2β1)/((1-β1)η) (AdamW, group 0)" in text
    store2 = Store()
    _sharp_run(store2, "a", "2/η (SGD, group 0)")
    _sharp_run(store2, "b", "(2+2β)/η (SGD, group 0)")
    app = StiffmonApp(store=store2, clock=lambda: 0.0)
    async with app.run_test(size=(160, 45)) as pilot:
        await pilot.press("4")
        await pilot.pause()
        assert "stability threshold per run (below)" in screen_text(app)
    store3 = Store()  # AdamW: no rule for λ1_H, the preconditioned one decides
    _sharp_run(store3, "a", "none: AdamW is adaptive", "(2+2β1)/((1-β1)η) (AdamW, group 0)")
    app = StiffmonApp(store=store3, clock=lambda: 0.0)
    async with app.run_test(size=(160, 45)) as pilot:
        await pilot.press("4")
        await pilot.pause()
        assert "stability threshold (2+2β1)/((1-β1)η)" in screen_text(app)
