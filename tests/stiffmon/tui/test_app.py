"""The Textual app driven by Pilot: every view and key, replay, runs appearing and stalling."""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np
import pytest

from stiffmon import protocol as p
from stiffmon.store import Store
from stiffmon.tui.app import StiffmonApp
from stiffmon.tui.sources import LiveSource, ReplaySource
from tests.stiffmon.tui.fixtures import write_sessions

SIZES = [(80, 24), (160, 45)]


def screen_text(app: StiffmonApp) -> str:
    """The visible characters of the screen (from the SVG export)."""
    svg = app.export_screenshot()
    parts = re.findall(r"<text[^>]*>(.*?)</text>", svg)
    return html.unescape("".join(parts)).replace("\xa0", " ")


def replay_app(tmp_path: Path, **kw: object) -> StiffmonApp:
    src = ReplaySource(write_sessions(tmp_path))
    src.load()
    return StiffmonApp(replay=src, clock=lambda: 0.0, screenshot_dir=tmp_path, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", SIZES)
async def test_every_view_and_key(tmp_path: Path, size: tuple[int, int]) -> None:
    app = replay_app(tmp_path)
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        text = screen_text(app)
        assert "sgd lr=0.01" in text and "loss" in text
        for key, view, needle in [
            ("1", "overview", "within-class stiffness"),
            ("2", "stiffness", "cos stiffness, train-train"),
            ("3", "distance", "stiffness vs distance"),
            ("4", "sharpness", "λ1_H per run"),
            ("5", "noise", "λ1_K"),
            ("6", "compare", "break-even"),
        ]:
            await pilot.press(key)
            await pilot.pause()
            assert app.view_name == view
            assert needle in screen_text(app), (view, needle)
        await pilot.press("2")
        await pilot.press("b")
        await pilot.pause()
        assert "train-val" in screen_text(app)
        await pilot.press("c")
        await pilot.pause()
        assert "sign stiffness" in screen_text(app)
        await pilot.press("shift+right", "shift+down")
        assert app.cursor == (1, 1)
        await pilot.press("left")
        await pilot.pause()
        assert "measurement 23/24" in screen_text(app)
        await pilot.press("right_square_bracket")
        assert app.selected == 1
        await pilot.press("t")
        assert not list(app.store.runs.values())[1].visible
        await pilot.press("t")
        for key, attr in (("l", "log_y"), ("x", "x_time")):
            await pilot.press(key)
            assert getattr(app, attr) is True
        await pilot.press("s")
        assert app.smooth_i == 1
        await pilot.press("6", "m")
        assert app.metric_i == 1
        await pilot.press("question_mark")
        await pilot.pause()
        assert "keys" in screen_text(app) and "SVG screenshot" in screen_text(app)
        await pilot.press("escape")
        await pilot.press("e")
        await pilot.pause()
        assert list(tmp_path.glob("stiffmon-compare-*.svg"))
        await pilot.press("ctrl+l")
        await pilot.press("q")


async def test_replay_timeline(tmp_path: Path) -> None:
    app = replay_app(tmp_path)
    src = app.replay
    assert src is not None
    total = len(src.messages)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        assert src.position == total and not src.playing  # opens at the end, paused
        await pilot.press("home")
        assert src.position == 0 and not app.store.runs
        await pilot.press("4", "right")
        await pilot.pause()
        first = src.position
        assert 0 < first < total
        assert all(
            len(rd.scalars.get("sharpness/lambda1_h", [])) <= 1 for rd in app.store.runs.values()
        )
        await pilot.press("right", "right", "left")
        assert src.position > first
        await pilot.press("minus", "minus")
        assert src.speed == 2.0
        await pilot.press("plus")
        assert src.speed == 5.0
        for _ in range(10):
            await pilot.press("plus")
        assert src.speed == float("inf")
        await pilot.press("space")  # play, as fast as possible
        await pilot.pause(0.5)
        assert src.position == total and not src.playing  # as fast as possible: done
        assert "replay" in screen_text(app)
        await pilot.press("end")
        assert src.position == total


async def test_replay_of_a_truncated_file(tmp_path: Path) -> None:
    paths = write_sessions(tmp_path)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 1000])
    src = ReplaySource(paths)
    src.load()
    app = StiffmonApp(replay=src, clock=lambda: 0.0)
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.pause()
        text = screen_text(app)
        assert "torn tail" in text and "sgd lr=0.05" in text
        assert app.store.runs["run1"].last_step > 500


def _hello(run: str) -> p.Hello:
    return p.Hello(run=run, seq=0, step=0, t=100.0, name=f"live {run}", optimizer={"lr": 0.1})


async def test_run_appears_stalls_and_finishes() -> None:
    now = [0.0]
    store = Store()
    app = StiffmonApp(store=store, clock=lambda: now[0])
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        assert "Nothing connected yet" in screen_text(app)
        store.apply(_hello("a"), now=now[0])
        for s in range(5):
            store.apply(
                p.Scalars(
                    run="a",
                    seq=s + 1,
                    step=s,
                    t=100.0 + s,
                    names=("loss",),
                    values=np.array([1.0 / (s + 1)]),
                ),
                now=now[0],
            )
        app.redraw(force=True)
        await pilot.pause()
        text = screen_text(app)
        assert "live a" in text and "live" in text
        now[0] = 10.0  # no message for 10 s
        app.redraw(force=True)
        await pilot.pause()
        assert "stal" in screen_text(app)
        store.apply(p.Bye(run="a", seq=7, step=4, t=105.0, reason="closed"), now=now[0])
        app.redraw(force=True)
        await pilot.pause()
        assert "fini" in screen_text(app)


async def test_live_source_with_nothing_listening_shows_how_to_connect() -> None:
    app = StiffmonApp(live=LiveSource(["tcp://127.0.0.1:9"]))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "Nothing connected yet" in text and "tcp://127.0.0.1:9" in text
        assert "malformed 0" in text


async def test_ascii_mode(tmp_path: Path) -> None:
    app = replay_app(tmp_path, ascii=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("4")
        await pilot.pause()
        text = screen_text(app)
        assert "*" in text and not any(0x2800 <= ord(ch) <= 0x28FF for ch in text)


async def test_replay_follows_a_file_that_is_still_written(tmp_path: Path) -> None:
    from stiffmon.session import SessionWriter
    from tests.stiffmon.tui.fixtures import run_messages

    msgs = run_messages(0.1, "grow", 0, steps=100)
    path = tmp_path / "growing.stiff"
    writer = SessionWriter(path)
    for m in msgs[:50]:
        writer.write(m)
    src = ReplaySource([path], follow=True)
    src.load()
    app = StiffmonApp(replay=src, clock=lambda: 0.0)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause(0.3)
        first = app.store.runs["grow"].last_step
        for m in msgs[50:]:
            writer.write(m)
        writer.close()
        for _ in range(50):
            await pilot.pause(0.1)
            if app.store.runs["grow"].finished:
                break
        rd = app.store.runs["grow"]
        assert rd.finished and rd.last_step == 99 > first
