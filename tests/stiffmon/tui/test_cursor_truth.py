"""What the monitor shows must not mislead: the cursor read-out never drops a run silently nor
shows a value that is no longer current, thresholds carry their values, a replay at its start
says so, and degenerate axes read sensibly (user findings 6, 7, 10, 12, 13)."""

from __future__ import annotations

import math

import numpy as np

from stiffmon import protocol as p
from stiffmon.store import Store
from stiffmon.tui import chrome
from stiffmon.tui.app import StiffmonApp
from stiffmon.tui.curvature import DensityMap
from stiffmon.tui.renderables import HLine, Line, LineChart
from stiffmon.tui.renderables.comparetable import LEGEND, be_cell, compare_table
from tests.stiffmon.tui.test_app import replay_app, screen_text
from tests.stiffmon.tui.test_renderables import render

FOUR = (0.001056, 41.45, 1.304e-07, 0.01444)


def _four_runs(cursor: float = 370.0) -> LineChart:
    x = np.arange(0.0, 800.0, 10.0)
    lines = [
        Line(x, np.full(x.shape, v), c)
        for v, c in zip(FOUR, ("red", "green", "blue", "yellow"), strict=True)
    ]
    return LineChart(lines, title="Tr K", cursor_x=cursor)


def _text(chart: LineChart, width: int, height: int) -> str:
    return "".join(s.text for s in chart.render_lines(width, height))


def test_readout_shows_every_run_when_the_line_is_too_long() -> None:
    text = _text(_four_runs(), 47, 12)  # a 120×40 noise-view chart
    assert "0.0144" in text and "1.3e-07" in text and "41." in text and "0.00106" in text


def test_readout_counts_the_runs_it_cannot_show() -> None:
    text = _text(_four_runs(), 28, 7)  # an 80×24 noise-view chart: one read-out row
    readout = text.splitlines()[1]
    shown = readout.count("■")
    assert shown < 4 and f"+{4 - shown} more" in readout


def _diverged_store() -> Store:
    """Run ``d`` measured once (step 0), diverged at 9, skipped as not finite from 20; run
    ``k`` ended at step 1750."""
    store = Store()
    for run in ("d", "k"):
        store.apply(p.Hello(run=run, seq=0, step=0, t=100.0, name=run))
    store.apply(
        p.Scalars.from_dict({"sharpness/lambda1_h": 13.63}, run="d", seq=1, step=0, t=100.0)
    )
    for s in range(400):
        loss = 1.0 if s < 9 else math.nan
        store.apply(p.Scalars.from_dict({"loss": loss}, run="d", seq=2 + s, step=s, t=100.0 + s))
    store.apply(
        p.Event(run="d", seq=900, step=9, t=109.0, level="warning", code="nan-loss", message="nan")
    )
    store.apply(
        p.Event(
            run="d",
            seq=901,
            step=20,
            t=120.0,
            level="warning",
            code="measurement-skipped",
            message="not finite",
            attrs={"kind": "sharpness", "metric": "sharpness", "reason": "not-finite"},
        )
    )
    for s in range(0, 1751, 50):
        store.apply(p.Scalars.from_dict({"accuracy": 1.0}, run="k", seq=s + 1, step=s, t=100 + s))
    return store


def test_readout_is_a_dash_after_divergence_and_past_the_end() -> None:
    from stiffmon.tui.runlines import run_line

    store = _diverged_store()
    d, k = store.runs["d"], store.runs["k"]
    lam = d.series("sharpness/lambda1_h")
    acc = k.series("accuracy")
    assert lam is not None and acc is not None
    lines = [
        run_line(d, "sharpness/lambda1_h", lam.steps * 1.0, lam.values, "red", "d", x_time=False),
        run_line(k, "accuracy", acc.steps * 1.0, acc.values, "blue", "k", x_time=False),
    ]
    assert lines[0].value_at(5) == 13.63 and math.isnan(lines[0].value_at(370))
    assert lines[1].value_at(1750) == 1.0 and math.isnan(lines[1].value_at(2500))
    text = _text(LineChart(lines, cursor_x=2500.0, x_range=(0, 3000)), 60, 12)
    assert "step 2500: ■ — ■ —" in text
    assert "13.63" not in _text(LineChart(lines, cursor_x=370.0), 60, 12)


def test_threshold_value_is_printed_and_named_above_the_chart() -> None:
    from stiffmon.tui.views.sharpness import with_value

    assert with_value("(2+2β)/η (SGD, group 0)", 190.0) == "(2+2β)/η = 190 (SGD, group 0)"
    x = np.arange(0.0, 800.0, 20.0)
    chart = LineChart([Line(x, 3 - np.exp(-x / 100), "red")], [HLine(190.0, "red", "thr")])
    assert "↑thr 190" in _text(chart, 60, 12)


def test_threshold_line_ends_at_its_runs_last_step() -> None:
    x = np.arange(0.0, 800.0, 20.0)
    chart = LineChart([Line(x, np.ones_like(x), "red")], [HLine(0.67, "red", x_end=399.0)])
    row = next(r for r in _text(chart, 60, 12).splitlines() if "╌" in r)
    left = row.index("│") + 1
    last = row.rindex("╌") - left
    assert 20 <= last <= 30  # about half of the 56-column plot, not all of it


def test_compare_says_the_threshold_and_a_diverged_tentative_break_even() -> None:
    assert "crossed 2/η" not in LEGEND
    s = {"break_even_step": 0, "break_even_reason": "threshold", "diverged": True}
    assert be_cell(s | {"break_even_status": "tentative"}) == "✕ 0 thr"
    table = compare_table([("a", "red", {"threshold_now": 190.0})], 80)
    assert "thr" in render(table, 80) and "190" in render(table, 80)


async def test_replay_at_its_start_does_not_say_watch(tmp_path: object) -> None:
    app = replay_app(tmp_path)  # type: ignore[arg-type]
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        await pilot.press("home")
        await pilot.pause()
        text = screen_text(app)
        assert "Nothing connected" not in text and "Replay at its start" in text


async def test_divergence_is_logged_at_the_step_it_happened() -> None:
    store = _diverged_store()
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause(0.3)
        said = [e for e in app.monitor_events.get("d", []) if "diverged" in e.message]
        assert said and said[0].step == 9 and said[0].t == 109.0
    assert chrome.when(store.runs["d"], "diverged at step 9") == (9, 109.0)


async def test_a_disabled_metric_is_logged_at_the_step_it_was_disabled() -> None:
    """The whole run is in the store before the app first looks (a replay read at once): the
    log dates "gram disabled" at its event (step 30), not at the run's last step."""
    store = Store()
    store.apply(p.Hello(run="g", seq=0, step=0, t=100.0, name="g"))
    for s in range(200):
        store.apply(p.Scalars.from_dict({"loss": 1.0}, run="g", seq=1 + s, step=s, t=100.0 + s))
    attrs = {"metric": "gram"}
    store.apply(
        p.Event(
            "g", 300, 30, 130.0, level="error", code="metric-disabled", message="oom", attrs=attrs
        )
    )
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause(0.3)
        said = [e for e in app.monitor_events.get("g", []) if "disabled" in e.message]
    assert said and (said[0].step, said[0].t) == (30, 130.0), said
    assert store.runs["g"].last_step == 199


def test_a_live_state_change_is_dated_by_how_long_the_run_was_quiet() -> None:
    """ "disconnected 60s" is logged 60 s after the last data, not at the last data's time."""
    store = Store()
    store.apply(p.Hello(run="q", seq=0, step=0, t=1000.0, name="q"), now=100.0)
    rd = store.runs["q"]
    assert chrome.when(rd, "disconnected 60s (tcp://x:1)", 160.0) == (0, 1060.0)
    assert chrome.when(rd, "live", 90.0) == (0, 1000.0)  # never before the last data
    rd.replay = True  # a replay's times are the recorded ones
    assert chrome.when(rd, "no bye (crashed?)", 160.0) == (0, 1000.0)


def test_one_measurement_axes_are_not_degenerate() -> None:
    dm = DensityMap([500], [np.linspace(0, 0.05, 50)], [np.ones(50)], title="d", height=4)
    assert "500 500" not in render(dm, 40)
    one = LineChart([Line(np.array([500.0]), np.array([1.0]), "red")])
    assert "501" not in _text(one, 40, 10)


def test_a_series_that_stops_early_spans_the_runs_steps() -> None:
    x = np.arange(0.0, 251.0, 10.0)
    chart = LineChart([Line(x, np.sin(x), "red")], x_span=(0.0, 800.0))
    chart.render_lines(60, 10)
    assert chart.plot_box is not None and chart.plot_box[3] == 800.0
