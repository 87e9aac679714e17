"""The words under the sharpness chart: a catapult named once, the threshold rule shown."""

from __future__ import annotations

import numpy as np

from stiffmon import protocol as p
from stiffmon.store import Store
from stiffmon.tui.app import StiffmonApp
from stiffmon.tui.views.sharpness import be_words, had_threshold, no_threshold_reason
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


def _sharp_run(
    store: Store,
    run: str,
    rule: str | None,
    precond_rule: str | None = None,
    thr: float = 18.0,
    first: int = 0,
) -> None:
    for i in range(first, first + 4):
        store.apply(
            p.Scalars.from_dict(
                {"sharpness/lambda1_h": 1.0 + i, "sharpness/threshold": thr},
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
        # the preconditioned threshold called so: it read as if λ1(P⁻¹H) were that value
        assert "preconditioned threshold (2+2β1)/((1-β1)η) (AdamW, group 0)" in text
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


NADAM = "none: NAdam is adaptive (preconditioned steps); no stability rule known"


async def test_a_run_without_a_stability_threshold_says_why_on_screen() -> None:
    """NAdam: no modelled threshold; the measurements carry the rule ``none: <why>`` (and the
    agent sends an info event); the words say it where the threshold would be."""
    store = Store()
    _sharp_run(store, "nadam", NADAM, thr=float("nan"))
    store.apply(
        p.Event(
            run="nadam",
            seq=99,
            step=0,
            t=0.0,
            code="threshold-none",
            message="no stability threshold on λ1_H: NAdam is adaptive (preconditioned steps); "
            "no stability rule known",
        ),
        replay=True,
    )
    rd = store.runs["nadam"]
    assert no_threshold_reason(rd) == NADAM.removeprefix("none: ")
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(160, 45)) as pilot:
        await pilot.press("4")
        await pilot.pause()
        text = screen_text(app)
        assert (
            "nadam: no stability threshold: NAdam is adaptive (preconditioned steps); no "
            "stability rule known; no break-even yet" in text
        )
        assert "threshold none" not in text
        assert "λ1_H per run, no stability threshold (why: below)" in text  # no ╌ line drawn
        assert "╌ stability threshold" not in text
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(120, 40)) as pilot:  # first, before a narrower line is cut
        await pilot.press("4")
        await pilot.pause()
        assert "nadam: no stability threshold: NAdam is adaptive (preconditioned steps)" in (
            screen_text(app)
        )


async def test_beside_a_run_with_a_threshold_the_title_keeps_its_rule() -> None:
    store = Store()
    _sharp_run(store, "sgd", "2/η (SGD, group 0)")
    _sharp_run(store, "nadam", NADAM, thr=float("nan"))
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(160, 45)) as pilot:
        await pilot.press("4")
        await pilot.pause()
        text = screen_text(app)
        assert "╌ stability threshold 2/η" in text
        assert "sgd: no break-even yet; threshold 18 (SGD, group 0)" in text
        assert "nadam: no stability threshold: NAdam is adaptive" in text


def test_without_a_rule_the_agents_event_says_why() -> None:
    """A session whose measurements carry no rule: the reason comes from the run's events."""
    store = Store()
    _sharp_run(store, "r", None, thr=float("nan"))
    rd = store.runs["r"]
    assert no_threshold_reason(rd) == ""  # nothing has said why yet
    store.apply(
        p.Event(
            run="r",
            seq=50,
            step=30,
            t=3.0,
            code="threshold-unknown",
            message="no stability threshold on λ1_H: Adagrad has no modelled rule",
        ),
        replay=True,
    )
    assert no_threshold_reason(rd) == "Adagrad has no modelled rule"
    _sharp_run(store, "s", None)  # a threshold value came: it has one
    store.runs["s"].note_event(store.runs["r"].events[-1])
    assert no_threshold_reason(store.runs["s"]) == ""


async def test_a_threshold_that_went_away_is_said_at_the_end() -> None:
    """A schedule took η to 0: there was a threshold (drawn), now there is none."""
    store = Store()
    _sharp_run(store, "r", "2/η (SGD, group 0)")
    zero = "none: non-positive learning rate 0.0 (SGD, group 0)"
    _sharp_run(store, "r", zero, thr=float("nan"), first=4)
    rd = store.runs["r"]
    assert had_threshold(rd)
    assert no_threshold_reason(rd) == "non-positive learning rate 0.0 (SGD, group 0)"
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(160, 45)) as pilot:
        await pilot.press("4")
        await pilot.pause()
        text = screen_text(app)
        assert (
            "r: no break-even yet; no stability threshold: non-positive learning rate 0.0" in text
        )
        assert "per run, ╌ stability threshold" in text  # the line drawn while there was one
