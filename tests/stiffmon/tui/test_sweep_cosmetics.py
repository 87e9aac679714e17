"""Cosmetics a learning-rate sweep showed: one ``finished`` line per run in the log, layers named
as layers in the distance legend, and no ``live:`` in the footer once every run is over."""

from __future__ import annotations

import numpy as np

from stiffmon import protocol as p
from stiffmon.store import Store
from stiffmon.transport import free_port_pair
from stiffmon.tui.app import StiffmonApp
from stiffmon.tui.sources import LiveSource
from stiffmon.tui.views.log import Log
from tests.stiffmon.tui.test_app import screen_text


def _live_run(store: Store, run: str, steps: int = 5) -> None:
    """A live run (hello and a few loss rows) seen at monitor time 0."""
    store.apply(p.Hello(run=run, seq=0, step=0, t=1_000.0, name=run), now=0.0)
    for i in range(1, steps + 1):
        store.apply(
            p.Scalars(
                run=run, seq=i, step=i, t=1_000.0 + i, names=("loss",), values=np.array([2.0 / i])
            ),
            now=0.0,
        )


def _finish(store: Store, run: str, step: int, with_event: bool) -> None:
    """What ``stiffmon demo``'s training script sends at its end: its own ``finished`` event
    (message prefixed with the run's name), then the bye."""
    if with_event:
        msg = f"{run}: validation accuracy 0.931 after {step} steps (12 s)"
        store.apply(
            p.Event(run=run, seq=90, step=step, t=1_100.0, code="finished", message=msg), now=0.0
        )
    store.apply(p.Bye(run=run, seq=91, step=step, t=1_100.0), now=0.0)


async def test_a_demo_run_says_finished_once_in_the_log() -> None:
    store = Store()
    _live_run(store, "sgd lr=0.05")
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.3)  # the run appears (live)
        _finish(store, "sgd lr=0.05", 5, with_event=True)
        await pilot.pause(0.3)  # the tick sees it finished
        await pilot.press("g")
        await pilot.pause()
        view = app.views["log"]
        assert isinstance(view, Log)
        texts = [r.text for r in view.rows()]
        said = [t for t in texts if "finished" in t]
        assert said == ["finished: validation accuracy 0.931 after 5 steps (12 s)"], texts
        assert screen_text(app).count("finished") == 1 + screen_text(app).count("✓ finished")


async def test_a_run_without_its_own_finished_event_keeps_the_monitors_line() -> None:
    store = Store()
    _live_run(store, "plain")
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.3)
        _finish(store, "plain", 5, with_event=False)
        await pilot.pause(0.3)
        view = app.views["log"]
        assert isinstance(view, Log)
        assert [r.text for r in view.rows() if "finished" in r.text] == ["finished"]


def _curve_run(store: Store) -> None:
    """A replayed run with curves in input space and in the activations of layers 0 and 3."""
    store.apply(p.Hello(run="r", seq=0, step=0, t=0.0, name="mlp"), replay=True)
    x = np.linspace(0.0, 1.0, 8, dtype=np.float32)
    for j, space in enumerate(("input", "0", "3")):
        store.apply(
            p.Curve(
                run="r",
                seq=1 + j,
                step=10,
                t=1.0,
                name=f"stiffness-distance/{space}",
                x=x,
                y=(0.5 - x).astype(np.float32),
                attrs={"xi": 0.5},
            ),
            replay=True,
        )
        store.apply(
            p.Scalars(
                run="r", seq=10 + j, step=10, t=1.0, names=(f"xi/{space}",), values=np.array([0.5])
            ),
            replay=True,
        )


async def test_the_distance_legend_names_layers_as_layers() -> None:
    store = Store()
    _curve_run(store)
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(140, 45)) as pilot:
        await pilot.press("3")
        await pilot.pause()
        text = screen_text(app)
        assert "layer 0" in text and "layer 3" in text, text
        assert "input" in text


async def test_the_footer_stops_saying_live_once_every_run_is_over() -> None:
    store = Store()
    for run in ("a", "b", "c"):
        _live_run(store, run)
    address = f"tcp://127.0.0.1:{free_port_pair()}"  # nobody there: the store is fed by hand
    app = StiffmonApp(store=store, live=LiveSource([address]), clock=lambda: 0.0)
    async with app.run_test(size=(140, 45)) as pilot:
        await pilot.pause(0.3)
        footer = screen_text(app)
        assert f"live: {address}" in footer
        _finish(store, "a", 5, with_event=False)
        _finish(store, "b", 5, with_event=False)
        await pilot.pause(0.3)
        assert f"live: {address}" in screen_text(app)  # c is still live
        store.apply(
            p.Bye(run="c", seq=92, step=5, t=1_100.0, reason="error: RuntimeError"), now=0.0
        )
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "live:" not in text, text
        assert f"all 3 runs over (2 finished, 1 ended); listening: {address}" in text
