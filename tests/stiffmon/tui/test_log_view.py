"""The log view merges the events of every run by wall-clock time, not by each run's own clock."""

from __future__ import annotations

from stiffmon import protocol as p
from stiffmon.store import Store
from stiffmon.tui.app import StiffmonApp
from stiffmon.tui.views.log import Log, wall_time
from tests.stiffmon.tui.test_app import screen_text


def _run(store: Store, run: str, start: float, events: list[tuple[float, str]]) -> None:
    """A run that started at Unix time ``start`` and sent ``events`` (seconds after it, text)."""
    store.apply(p.Hello(run=run, seq=0, step=0, t=start, name=run), replay=True)
    for i, (after, text) in enumerate(events, 1):
        store.apply(
            p.Event(run=run, seq=i, step=10 * i, t=start + after, code="", message=text),
            replay=True,
        )


def _agent_rows(app: StiffmonApp) -> list[str]:
    view = app.views["log"]
    assert isinstance(view, Log)
    return [r.text for r in view.rows() if r.text.startswith("ev ")]


async def test_runs_started_apart_are_merged_by_wall_clock_time() -> None:
    store = Store()
    _run(store, "early", 1_000.0, [(5.0, "ev early +5s"), (500.0, "ev early +500s")])
    # started 400 s later: its +50 s is after early's +5 s, its +200 s after early's +500 s
    _run(store, "late", 1_400.0, [(50.0, "ev late +50s"), (200.0, "ev late +200s")])
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("g")
        await pilot.pause()
        assert _agent_rows(app) == [
            "ev early +5s",
            "ev late +50s",  # t 1450 (by the run's own clock, +50 s, it came second before)
            "ev early +500s",  # t 1500
            "ev late +200s",  # t 1600
        ]
        text = screen_text(app)  # newest first on screen
        assert (
            text.index("ev late +200s") < text.index("ev early +500s") < text.index("ev late +50s")
        )


async def test_events_at_the_same_time_keep_their_order() -> None:
    store = Store()
    _run(store, "a", 1_000.0, [(10.0, "ev a first"), (10.0, "ev a second")])
    _run(store, "b", 1_005.0, [(5.0, "ev b same time")])  # t 1010 too (+5 s: first by its own)
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("g")
        await pilot.pause()
        assert _agent_rows(app) == ["ev a first", "ev a second", "ev b same time"]


def test_an_event_without_a_finite_time_sorts_at_its_runs_start() -> None:
    assert wall_time(1234.5, 1000.0) == 1234.5
    assert wall_time(float("nan"), 1000.0) == 1000.0
    assert wall_time(float("nan"), float("nan")) == float("-inf")
