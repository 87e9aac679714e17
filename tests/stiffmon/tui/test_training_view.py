"""The training view's learning-rate (and momentum) chart shows every param group, one line per
distinct schedule, with a legend; a run whose groups agree stays one line."""

from __future__ import annotations

import pytest

from stiffmon.store import Store
from stiffmon.tui.app import StiffmonApp
from stiffmon.tui.renderables import LineChart
from stiffmon.tui.views.training import group_chart
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
