"""A replay shows what the live monitor showed: a recorded hang as a ``stalled`` warning in the
log (at its step), and each run's ``run appeared`` at the run's first step, not at the step
the replay had reached when the monitor first looked (``--speed 0`` then End)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stiffmon.session import SessionWriter
from stiffmon.tui.app import StiffmonApp
from stiffmon.tui.sources import ReplaySource
from stiffmon.tui.views.log import Log
from tests.stiffmon.test_replay_stalls import messages, step_times
from tests.stiffmon.tui.test_app import notified, screen_text


def write(path: Path, msgs: list) -> Path:  # type: ignore[type-arg]
    with SessionWriter(path) as w:
        for m in msgs:
            w.write(m)
    return path


async def test_a_replayed_hang_is_in_the_log_at_its_step(tmp_path: Path) -> None:
    path = write(tmp_path / "hung.stiff", messages("hung", step_times(600, 0.05, 300, 60.0)))
    src = ReplaySource([path], at_end=True)
    src.load()
    app = StiffmonApp(replay=src, clock=lambda: 0.0)
    async with app.run_test(size=(140, 40)) as pilot:
        await pilot.press("g")
        await pilot.pause()
        view = app.views["log"]
        assert isinstance(view, Log)
        rows = [r for r in view.rows() if r.text.startswith("stalled")]
        assert [(r.level, r.step) for r in rows] == [("warning", 300)]
        assert "no step since 300 for 60s" in rows[0].text
        assert "stalled: no step since 300 for 60s" in screen_text(app)
        assert await notified(app, pilot, "hung: stalled: no step since 300")  # as live says it


async def test_runs_appear_at_their_first_step_after_a_max_speed_replay(tmp_path: Path) -> None:
    """Six runs in one recording, run k's first step at 200 k (one process, agents started one
    after another); at full speed the monitor's first look comes after all of them."""
    msgs = []
    for k in range(6):
        times = step_times(1200, 0.01, None, 0.0)[: 1200 - 200 * k] + 0.01 * 200 * k
        for m in messages(f"r{k}", times):
            if hasattr(m, "steps"):  # shift run k's steps to start at 200 k
                object.__setattr__(m, "steps", m.steps + 200 * k)
                object.__setattr__(m, "step", int(m.steps[-1]))
            elif m.KIND == "bye":
                object.__setattr__(m, "step", 1199)
            msgs.append(m)
    msgs.sort(key=lambda m: m.t)
    path = write(tmp_path / "sweep.stiff", msgs)
    src = ReplaySource([path], at_end=False, speed=float("inf"))
    src.load()
    app = StiffmonApp(replay=src, clock=lambda: 0.0)
    async with app.run_test(size=(140, 40)) as pilot:
        await pilot.press("end")
        await pilot.pause(0.3)
        first = {rd.name: rd.first_step for rd in app.store.runs.values()}
        assert first == {f"r{k}": 200 * k for k in range(6)}
        view = app.views["log"]
        assert isinstance(view, Log)
        appeared = {r.run: r.step for r in view.rows() if r.text.startswith("run appeared")}
        assert appeared == first, appeared
        assert np.unique(list(appeared.values())).size == 6
