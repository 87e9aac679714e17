"""The training view's learning-rate (and momentum) chart shows every param group, one line per
distinct schedule, with a legend; a run whose groups agree stays one line."""

from __future__ import annotations

import pytest
from rich.segment import Segment

from stiffmon import protocol as p
from stiffmon.store import Store
from stiffmon.tui.app import StiffmonApp
from stiffmon.tui.renderables import LineChart
from stiffmon.tui.views.training import accuracy_off, group_chart, no_accuracy_text
from tests.stiffmon.tui.test_app import feed, screen_text


def lr_store(runs: dict[str, dict[str, float]], steps: int = 40) -> Store:
    """Runs fed ``steps`` steps of the given per-step scalars; ``lr/1`` halves at step 20."""
    store = Store()
    for run, values in runs.items():
        feed(store, run, range(20), now=0.0, **values)
        later = {k: v / 2 if k == "lr/1" else v for k, v in values.items()}
        feed(store, run, range(20, steps), now=0.0, **later)
    return store


def lr_chart(app: StiffmonApp) -> LineChart:
    chart = group_chart(app.views["training"], "lr", "lr", "learning rate η")(60, 20)
    assert isinstance(chart, LineChart)
    return chart


@pytest.mark.parametrize("size", [(120, 40), (80, 24)], ids=["120x40", "80x24"])
async def test_every_param_groups_lr_is_a_line_with_a_legend(size: tuple[int, int]) -> None:
    store = lr_store({"a": {"lr/0": 0.1, "lr/1": 0.01}})
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=size) as pilot:
        await pilot.press("7")
        await pilot.pause()
        text = screen_text(app)
        assert "lr g0" in text and "lr g1" in text  # the legend (group 0 only before)
        assert "learning rate η per param g" in text
        chart = lr_chart(app)
        assert [ln.label for ln in chart.lines] == ["lr g0", "lr g1"]
        assert len({ln.color for ln in chart.lines}) == 2  # told apart: shades of the run's
        assert float(chart.lines[1].y[-1]) == pytest.approx(0.005)  # group 1's own schedule


async def test_groups_with_the_same_lr_at_every_step_are_one_line() -> None:
    store = lr_store({"a": {"lr/0": 0.1, "lr/2": 0.1}})
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("7")
        await pilot.pause()
        chart = lr_chart(app)
        assert [ln.label for ln in chart.lines] == ["live a"]  # the run's name, no legend
        text = screen_text(app)
        assert "lr g" not in text and "per param group" not in text


async def test_several_runs_name_the_run_and_merge_equal_groups() -> None:
    store = lr_store(
        {
            "a": {"lr/0": 0.1, "lr/1": 0.01, "lr/2": 0.1},  # groups 0 and 2 agree
            "b": {"lr/0": 0.3},
        }
    )
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("7")
        await pilot.pause()
        chart = lr_chart(app)
        assert [ln.label for ln in chart.lines] == ["live a g0,2", "live a g1", "live b"]
        assert chart.legend


NO_LOGITS = "no accuracy: step() gets no logits/targets (pass logits=, targets= for it)"


def _accuracy_off(store: Store, run: str, text: str = NO_LOGITS) -> None:
    store.apply(
        p.Event(run=run, seq=500, step=0, t=100.0, code="accuracy-off", message=text), now=0.0
    )


def accuracy_chart(app: StiffmonApp) -> LineChart:
    chart = app.views["training"].metric_chart(
        "accuracy", "accuracy (train batch)", empty=no_accuracy_text
    )(60, 20)
    assert isinstance(chart, LineChart)
    return chart


async def test_a_run_that_never_sends_an_accuracy_says_why_not_no_accuracy_yet() -> None:
    store = lr_store({"a": {"lr/0": 0.1}})
    _accuracy_off(store, "a")
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(160, 45)) as pilot:
        await pilot.press("7")
        await pilot.pause()
        text = screen_text(app)
        assert "no accuracy (train batch) yet" not in text
        assert "no accuracy: step() gets no logits/targets" in text
        assert "(pass logits=, targets=" in text and "for it)" in text  # wrapped
        chart = accuracy_chart(app)
        assert chart.empty_text == NO_LOGITS  # drawn dim, as every chart's empty text
        rows = "".join(s.text for s in chart.render_lines(60, 20) if isinstance(s, Segment))
        assert "no accuracy: step() gets no" in rows
        assert all(
            s.style is not None and s.style.dim
            for s in chart.render_lines(60, 20)
            if isinstance(s, Segment) and "no accuracy" in s.text
        )


async def test_no_accuracy_yet_stays_for_runs_that_may_still_send_one() -> None:
    store = lr_store({"a": {"lr/0": 0.1}, "b": {"lr/0": 0.2}})
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(160, 45)) as pilot:
        await pilot.press("7")
        await pilot.pause()
        assert "no accuracy (train batch) yet" in screen_text(app)
        _accuracy_off(store, "a")  # b may still send one: both said
        assert accuracy_chart(app).empty_text == (
            f"no accuracy (train batch) yet; live a: {NO_LOGITS}"
        )
        _accuracy_off(store, "b")  # the same reason for both: said once
        assert accuracy_chart(app).empty_text == NO_LOGITS
        _accuracy_off(store, "b", "no accuracy: regression targets")
        assert accuracy_chart(app).empty_text == (
            f"live a: {NO_LOGITS}; live b: no accuracy: regression targets"
        )


def test_a_run_with_an_accuracy_is_drawn_whatever_another_says() -> None:
    store = lr_store({"a": {"lr/0": 0.1, "accuracy": 0.5}, "b": {"lr/0": 0.2}})
    _accuracy_off(store, "b")
    assert no_accuracy_text([store.runs["b"]], "x") == NO_LOGITS
    assert accuracy_off(store.runs["a"]) == ""
