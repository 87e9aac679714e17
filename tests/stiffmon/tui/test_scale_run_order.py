"""A sweep's runs in a chosen order: ``o`` cycles connect / name / lr; the run list, ``[``/``]``
and the selected run follow it; names sort naturally (``lr=0.01`` < ``lr=0.1`` < ``lr=1``)."""

from __future__ import annotations

from stiffmon.store import Store
from stiffmon.tui.app import StiffmonApp
from tests.stiffmon.tui.test_app import feed, screen_text

NAMES = ["sgd lr=1", "sgd lr=0.1", "sgd lr=12", "sgd lr=0.01", "sgd lr=2e-3"]
LRS = {
    "sgd lr=1": 1.0,
    "sgd lr=0.1": 0.1,
    "sgd lr=12": 12.0,
    "sgd lr=0.01": 0.01,
    "sgd lr=2e-3": 2e-3,
}


def test_natural_key_orders_numbers_by_value() -> None:
    from stiffmon.tui.views.base import natural_key

    got = sorted(NAMES, key=natural_key)
    assert got == ["sgd lr=2e-3", "sgd lr=0.01", "sgd lr=0.1", "sgd lr=1", "sgd lr=12"]
    assert sorted(["run10", "run9", "Run2"], key=natural_key) == ["Run2", "run9", "run10"]


def sel(app: StiffmonApp) -> str:
    """The selected run's id."""
    rd = app.views["overview"].selected_run()
    assert rd is not None
    return next(run for run, r in app.store.runs.items() if r is rd)


async def test_o_sorts_the_run_list_and_brackets_follow() -> None:
    store = Store()
    for name in NAMES:
        feed(store, name, range(3), now=0.0, **{"lr/0": LRS[name]})
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(140, 45)) as pilot:
        await pilot.pause()
        assert sel(app) == "sgd lr=1"  # connect order
        await pilot.press("o")  # name
        await pilot.pause()
        assert app.run_order == "name"
        assert next(iter(store.runs)) == "sgd lr=2e-3"
        assert sel(app) == "sgd lr=1"  # still the same run
        await pilot.press("right_square_bracket")
        assert sel(app) == "sgd lr=12"  # next by name
        text = screen_text(app)
        pos = [
            text.find(f"live {n}│")
            for n in ["sgd lr=2e-3", "sgd lr=0.01", "sgd lr=0.1", "sgd lr=1"]
        ]
        assert -1 not in pos and pos == sorted(pos), text
        await pilot.press("o")  # lr: the same as natural name order here, by value
        await pilot.pause()
        assert app.run_order == "lr"
        assert list(store.runs) == sorted(NAMES, key=LRS.__getitem__)
        feed(store, "sgd lr=0.5", range(3), now=0.0, **{"lr/0": 0.5})  # joins in its place
        await pilot.pause(0.3)
        assert list(store.runs)[3] == "sgd lr=0.5"
        colours = {run: rd.index for run, rd in store.runs.items()}
        assert colours["sgd lr=1"] == 0  # colours stay by connect order
        await pilot.press("o")
        await pilot.pause()
        assert app.run_order == "connect"
        assert list(store.runs) == [*NAMES, "sgd lr=0.5"]
