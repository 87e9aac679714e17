"""The Textual app driven by Pilot: every view and key, replay, runs appearing and stalling."""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from pathlib import Path

import pytest
from textual import events
from textual.pilot import Pilot

from stiffmon import protocol as p
from stiffmon.store import Store
from stiffmon.tui.app import StiffmonApp
from stiffmon.tui.sources import LiveSource, ReplaySource
from stiffmon.tui.views import ChartView
from tests.stiffmon.timeline import FakeAgent
from tests.stiffmon.tui.fixtures import write_sessions

SIZES = [(80, 24), (160, 45)]


def screen_text(app: StiffmonApp) -> str:
    """The visible characters of the screen (from the SVG export)."""
    svg = app.export_screenshot()
    parts = re.findall(r"<text[^>]*>(.*?)</text>", svg)
    return html.unescape("".join(parts)).replace("\xa0", " ")


async def notified(app: StiffmonApp, pilot: Pilot[None], words: str, timeout: float = 5.0) -> bool:
    """Whether a notification containing ``words`` arrives within ``timeout`` seconds: ``notify``
    posts a message, so a tick that raised one may be processed before its message is."""
    for _ in range(int(timeout / 0.05)):
        if any(words in n.message for n in app._notifications):
            return True
        await pilot.pause(0.05)
    return any(words in n.message for n in app._notifications)


def replay_app(tmp_path: Path, **kw: object) -> StiffmonApp:
    src = ReplaySource(write_sessions(tmp_path), at_end=True)
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
            ("7", "training", "learning rate"),
            ("8", "layers", "stiffness per layer"),
            ("9", "spectra", "Hessian eigenvalues"),
            ("0", "custom", "val_loss"),
            ("g", "log", "run appeared"),
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
        await pilot.press("2", "left")
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
        assert "keys" in screen_text(app) and "zoom" in screen_text(app)
        await pilot.press("escape")
        await pilot.press("e")
        await pilot.pause()
        assert list(tmp_path.glob("stiffmon-compare-*.svg"))
        text = screen_text(app)
        for words in (
            "6 compare",
            "sgd lr=0.01",
            "sgd lr=0.05",
            "sgd lr=0.2",
            "finished",
            "step 599",
            "η/B",
            "loss",
            "palette",
            "screenshot",
        ):
            assert words in text, words  # nothing meaningful cut at this size
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
    src = ReplaySource(paths, at_end=True)
    src.load()
    app = StiffmonApp(replay=src, clock=lambda: 0.0)
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.pause()
        text = screen_text(app)
        assert "torn tail" in text and "sgd lr=0.05" in text
        assert app.store.runs["run1"].last_step > 500


def _hello(run: str) -> p.Hello:
    return p.Hello(run=run, seq=0, step=0, t=100.0, name=f"live {run}", optimizer={"lr": 0.1})


def feed(
    store: Store, run: str, steps: Iterable[int], now: float, loss: float = 0.5, **extra: float
) -> None:
    """A run's hello (once) and one scalars message per step, applied to the store directly."""
    if run not in store.runs:
        store.apply(_hello(run), now=now)
    for s in steps:
        values = {"loss": loss, **extra}
        store.apply(p.Scalars.from_dict(values, run=run, seq=s + 1, step=s, t=100.0 + s), now=now)


def _event(run: str, step: int, code: str, message: str, level: str, **attrs: object) -> p.Event:
    return p.Event(
        run=run,
        seq=1000 + step,
        step=step,
        t=100.0 + step,
        level=level,
        code=code,
        message=message,
        attrs=attrs,
    )  # type: ignore[arg-type]


async def test_run_registers_later_stalls_on_the_timer_and_finishes() -> None:
    now = [0.0]
    store = Store()
    app = StiffmonApp(store=store, clock=lambda: now[0])
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        assert "Nothing connected yet" in screen_text(app)
        feed(store, "a", range(5), now=0.0)  # a run that registers after the monitor started
        await pilot.pause(0.3)  # no redraw asked for: the timer picks it up
        text = screen_text(app)
        assert "live a" in text and "● live" in text
        now[0] = 10.0  # no message for 10 s: nothing arrives, the timer notices
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "stalled 10s" in text  # the run list
        assert await notified(app, pilot, "live a: stalled: no message for 3 s")
        store.apply(p.Bye(run="a", seq=7, step=4, t=105.0, reason="closed"), now=now[0])
        await pilot.pause(0.3)
        assert "✓ finished" in screen_text(app)
        assert [e.message for e in app.monitor_events["a"]][-1] == "finished"


async def test_a_hung_loop_with_a_live_agent_is_shown_and_notified() -> None:
    store = Store()
    agent = FakeAgent(store, "a")
    app = StiffmonApp(store=store, clock=lambda: agent.now)
    async with app.run_test(size=(100, 30)) as pilot:
        agent.steps(0.05 * (k + 1) for k in range(150))  # step 149 at 7.5 s, then it hangs
        agent.advance(7.5)
        await pilot.pause(0.3)
        assert "● live" in screen_text(app)
        agent.advance(19.5)  # heartbeats keep coming: no message stall, but no step for 12 s
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "live a: stalled 12s (no step since 149; agent alive)" in text  # overview
        assert "no step since 149" in text and "agent alive" in text  # the run list
        assert await notified(app, pilot, "live a: stalled: no step since 149 for")
        agent.steps([19.55, 19.6])
        agent.advance(19.6)
        await pilot.pause(0.3)
        assert "● live" in screen_text(app)
        assert [e.message for e in app.monitor_events["a"]][-1] == "live again"


async def test_a_run_that_diverges_is_shown_and_notified() -> None:
    store = Store()
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(100, 30)) as pilot:
        feed(store, "a", range(19), now=0.0)
        await pilot.pause(0.3)
        feed(store, "a", [19], now=0.0, loss=float("nan"))
        store.apply(_event("a", 19, "nan-loss", "loss is nan at step 19", "warning"), now=0.0)
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "diverged @19" in text  # run list
        assert "live a: diverged at step 19" in text  # overview health line
        assert await notified(app, pilot, "live a: diverged at step 19")
        await pilot.press("g")
        await pilot.pause()
        text = screen_text(app)
        assert "nan-loss: loss is nan at step 19" in text and "error" in text


async def test_an_agent_warning_is_notified_once_per_kind() -> None:
    """A warning event of the agent (here ``step-order``) pops up once per run and code, not
    at every repeat; ones the run's health already says (nan-loss) do not pop up twice."""
    store = Store()
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(100, 30)) as pilot:
        feed(store, "a", range(5), now=0.0)
        for step in (3, 4):
            store.apply(
                _event("a", step, "step-order", "agent.step() is called before", "warning"),
                now=0.0,
            )
        store.apply(_event("a", 4, "precond-warmup", "no threshold yet", "info"), now=0.0)
        assert await notified(app, pilot, "live a: agent.step() is called before")
        await pilot.pause(0.3)
        app.check_health()
        said = [n.message for n in app._notifications]
        assert sum("agent.step() is called before" in m for m in said) == 1
        assert not any("no threshold yet" in m for m in said)  # info: the log view only


async def test_a_run_that_loses_a_metric_says_why() -> None:
    store = Store()
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(100, 30)) as pilot:
        feed(store, "a", range(3), now=0.0)
        store.apply(
            _event(
                "a", 2, "metric-error", "gram failed: RuntimeError: boom", "error", metric="gram"
            ),
            now=0.0,
        )
        store.apply(
            _event(
                "a",
                2,
                "metric-disabled",
                "gram disabled for the rest of the run",
                "warning",
                metric="gram",
            ),
            now=0.0,
        )
        for i, s in enumerate((50, 100, 150)):
            store.apply(
                _event(
                    "a", s, "measurement-skipped", "", "info", kind="sharpness", reason="overhead"
                ),
                now=0.0,
            )
            feed(
                store,
                "a",
                [s],
                now=0.0,
                **{"coverage/sharpness/done": 1.0, "coverage/sharpness/skipped": i + 1.0},
            )
        for _ in range(50):  # the app's 10 Hz tick draws it (late on a busy machine)
            await pilot.pause(0.1)
            text = screen_text(app)
            if "sharpness 1/4 (cap)" in text:
                break
        assert "gram disabled" in text and "sharpness 1/4 (cap)" in text  # run list
        assert "gram disabled: gram failed: RuntimeError: boom" in text  # overview
        assert await notified(app, pilot, "gram disabled")
        await pilot.press("g", "f", "f")  # errors only
        await pilot.pause()
        text = screen_text(app)
        assert "metric-error" in text and "metric-disabled" not in text
        await pilot.press("f", "slash")  # all levels, then a text filter
        await pilot.press(*"skipped", "enter")
        await pilot.pause()
        text = screen_text(app)
        assert "measurement-skipped" in text and "metric-error" not in text


async def test_custom_scalars_get_a_view_and_join_the_overlay() -> None:
    store = Store()
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(100, 30)) as pilot:
        feed(store, "a", range(0, 100, 10), now=0.0, **{"custom/val_loss": 0.5})
        await pilot.press("0")
        await pilot.pause()
        assert "val_loss" in screen_text(app)
        await pilot.press("6")
        n = len(app.views["compare"].metrics())  # type: ignore[attr-defined]
        await pilot.press(*["m"] * (n - 1))
        await pilot.pause()
        assert "overlay: custom/val_loss" in screen_text(app)


async def test_zoom_pan_and_cursor_read_out(tmp_path: Path) -> None:
    app = replay_app(tmp_path)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("4")
        await pilot.pause()
        await pilot.press("z")
        await pilot.pause()
        assert app.x_window is not None
        lo, hi = app.x_window
        assert 0 < lo < hi < 599 and "zoom" in screen_text(app)
        await pilot.press("greater_than_sign")
        assert app.x_window[0] > lo
        await pilot.press("comma")
        await pilot.pause()
        assert app.cursor_x is not None and "step " in screen_text(app)
        await pilot.press("escape")
        assert app.x_window is None and app.cursor_x is None
        await pilot.click(ChartView, offset=(60, 10))  # a click puts the cursor there
        await pilot.pause()
        assert app.cursor_x is not None and 200 < app.cursor_x < 599
        chart = app.query_one("#sharpness").query_one(ChartView)
        chart.on_mouse_scroll_up(events.MouseScrollUp(chart, 60, 10, 0, 0, 0, False, False, False))
        assert app.x_window is not None


async def test_ctrl_c_quits_and_the_palette_has_our_commands(tmp_path: Path) -> None:
    app = replay_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for t in (
            "View: log",
            "View: custom",
            "Run: select sgd lr=0.2",
            "Toggle: log-y axis",
            "Screenshot (SVG)",
        ):
            assert t in titles
        await pilot.press("ctrl+c")
        await pilot.pause()
        assert not app.is_running


async def test_live_source_with_nothing_listening_shows_how_to_connect() -> None:
    app = StiffmonApp(live=LiveSource(["tcp://127.0.0.1:9"]))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "Nothing connected yet" in text and "tcp://127.0.0.1:9" in text
        assert "malformed 0" in text


async def test_ascii_mode_draws_only_ascii(tmp_path: Path) -> None:
    app = replay_app(tmp_path, ascii=True)
    async with app.run_test(size=(80, 24)) as pilot:
        for key in "1234567890g":
            await pilot.press(key)
            await pilot.pause()
            text = screen_text(app)
            bad = sorted({ch for ch in text if not ch.isascii()})
            assert not bad, (key, bad)
        await pilot.press("4")
        await pilot.pause()
        assert "*" in screen_text(app)


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


async def test_replay_opens_at_the_start_and_plays(tmp_path: Path) -> None:
    src = ReplaySource(write_sessions(tmp_path), speed=1.0, at_end=False)
    src.load()
    app = StiffmonApp(replay=src, clock=lambda: 0.0)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.2)
        assert src.playing and 0 < src.position < len(src.messages)


async def test_seeking_back_in_a_replay_does_not_log_events_twice(tmp_path: Path) -> None:
    """The store is rebuilt on a seek back; the monitor's own log restarts with it."""
    app = replay_app(tmp_path)
    replay = app.replay
    assert replay is not None
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        app.check_health()
        for _ in range(3):
            replay.seek(app.store, len(replay.messages) // 2)  # back to the middle
            app.check_health()
            await pilot.press("end")  # and to the end again
            await pilot.pause()
            app.check_health()
        logged = {run: [e.message for e in evs] for run, evs in app.monitor_events.items()}
    assert logged
    for run, msgs in logged.items():
        assert sum("finished" in m for m in msgs) == 1, (run, msgs)


@pytest.mark.parametrize("size", SIZES)
async def test_log_y_of_an_all_zero_series_is_not_no_data_yet(
    tmp_path: Path, size: tuple[int, int]
) -> None:
    app = replay_app(tmp_path)  # plain SGD: momentum 0 at every step
    async with app.run_test(size=size) as pilot:
        await pilot.press("7")
        await pilot.pause()
        assert "no momentum β yet" not in screen_text(app)
        await pilot.press("l")
        await pilot.pause()
        text = screen_text(app)
        assert "no momentum β yet" not in text
        # wrapped in the narrow chart: the words, not the lines
        for words in ("momentum β: no", "positive", "values to draw", "log", "(l:", "linear y"):
            assert words in text, words
