"""The stiffmon terminal monitor (Textual): the shell around the views of :mod:`stiffmon.tui.views`.

The app holds the toggles the views read (log-y, smoothing, x axis, zoom window, cursor, …), the
keys, the layout, the sources and the 10 Hz timer. Each tick ingests what the sources have,
checks every run's health (a run stalls without any new message, so this is on the timer too),
notifies when a run diverges, stalls or loses a metric, and redraws the visible view when the
store or a run's state changed. Drawing is pure Rich renderables (:mod:`stiffmon.tui.renderables`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ClassVar

from textual.app import App, ComposeResult, SystemCommand
from textual.binding import BindingType
from textual.containers import Horizontal
from textual.css.query import NoMatches
from textual.notifications import SeverityLevel
from textual.screen import Screen
from textual.widgets import ContentSwitcher, Footer, Input, Static

from stiffmon import protocol as p
from stiffmon.process_check import WriterWatch
from stiffmon.store import Health, RunData, Store
from stiffmon.tui import chrome
from stiffmon.tui.help import HelpScreen
from stiffmon.tui.keys import BINDINGS
from stiffmon.tui.replay_keys import SPEEDS as SPEEDS
from stiffmon.tui.replay_keys import ReplayKeys
from stiffmon.tui.runpanel import RunPanel
from stiffmon.tui.sources import LiveSource, ReplaySource
from stiffmon.tui.terminal import ascii_mode
from stiffmon.tui.views import BLOCKS, VIEWS, ChartView, View
from stiffmon.tui.views.base import RUN_ORDERS, SMOOTHING, sorted_runs
from stiffmon.tui.views.log import LEVELS

VIEW_NAMES = tuple(v.name for v in VIEWS)
SEVERITY: dict[str, SeverityLevel] = {
    "info": "information",
    "warning": "warning",
    "error": "error",
}


class StiffmonApp(App[None], ReplayKeys):
    """The monitor. Give it a live source, a replay source, or neither (a store fed by tests)."""

    CSS_PATH = "app.tcss"
    TITLE = "stiffmon"
    AUTO_FOCUS = None  # the app's keys stay the app's until "/" focuses the log filter
    BINDINGS: ClassVar[list[BindingType]] = BINDINGS

    def __init__(
        self,
        *,
        store: Store | None = None,
        live: LiveSource | None = None,
        replay: ReplaySource | None = None,
        ascii: bool = False,
        screenshot_dir: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        shoot_views: bool = False,
    ) -> None:
        super().__init__()
        self.store = store or Store()
        self.live, self.replay = live, replay
        self.ascii = ascii if shoot_views else ascii_mode(ascii)  # SVGs: no terminal to fit
        self.screenshot_dir = screenshot_dir or Path.cwd()
        self.clock = clock
        self.views: dict[str, View] = {v.name: v(self) for v in VIEWS}
        self.view_name = "overview"
        self.log_y = self.x_time = self.paused = False
        self.smooth_i = self.block_i = self.metric_i = self.selected = 0
        self.run_order = RUN_ORDERS[0]
        self.kind = "cos"
        self.scrub: int | None = None  # measurement index in the stiffness / distance views
        self.cursor = (0, 0)  # heatmap cell
        self.x_window: tuple[float, float] | None = None  # zoom on the x axis
        self.cursor_x: float | None = None  # step cursor with a read-out
        self.log_level, self.log_text, self.log_selected_only = "info", "", False
        self.monitor_events: dict[str, list[p.Event]] = {}  # stalls, new runs… per run
        self._health: dict[str, Health] = {}
        self._writers = WriterWatch()  # a followed file's writer: alive or gone
        self._health_of: dict[str, RunData] = {}  # the run data each health was judged on
        self._checked = False
        self._events_seen: dict[str, int] = {}  # per run: events looked at for notifications
        self._said: dict[str, set[str]] = {}  # per run: event codes notified
        self._drawn_version = -1
        self._last_tick = time.monotonic()
        self.shoot_views = shoot_views  # save an SVG of every view into screenshot_dir, then exit
        self.shots: list[Path] = []

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Static(id="title")
        with Horizontal(id="body"):
            yield RunPanel(id="runs")
            with ContentSwitcher(initial="overview", id="views"):
                for view in self.views.values():
                    yield view.widget()
            yield Static(id="empty")
        yield Static(id="status")
        yield Footer(show_command_palette=not self.ascii)  # its ▏ separator is not ASCII

    def on_mount(self) -> None:
        if self.ascii:
            self.add_class("ascii")
        if self.live is not None:
            self.run_worker(self.live.run, thread=True, exclusive=False, name="live")
        if self.replay is not None:
            if not self.replay.messages:
                self.replay.load()
            for path, why in self.replay.unopened.items():  # left out; the others are shown
                self.notify(f"{path.name} not opened: {why}", title="stiffmon", severity="error")
            self.replay.open(self.store)  # the start, playing (at_end: the end, paused)
            if self.replay.follow:
                self.run_worker(self.replay.follow_loop, thread=True, name="follow")
        self.set_interval(0.1, self.tick)
        self.tick()
        if self.shoot_views:
            self.call_after_refresh(self._shoot, 0)

    def _shoot(self, i: int) -> None:
        """Save view ``i`` (after it has been drawn), then go on to the next one or exit."""
        if i > 0:
            name = f"{VIEW_NAMES.index(self.view_name) + 1}-{self.view_name}.svg"
            self.shots.append(
                Path(self.save_screenshot(filename=name, path=str(self.screenshot_dir)))
            )
        if i == len(VIEW_NAMES):
            self.exit()
            return
        self.action_view(VIEW_NAMES[i])
        self.set_timer(0.3, lambda: self._shoot(i + 1))

    def on_unmount(self) -> None:
        for src in (self.live, self.replay):
            if src is not None:
                src.stop.set()

    # ------------------------------------------------------------------ the 10 Hz tick

    def tick(self) -> None:
        with contextlib.suppress(NoMatches):  # the screen is being torn down (or not built yet)
            now = time.monotonic()
            dt, self._last_tick = now - self._last_tick, now
            if self.live is not None and not self.paused:
                for text in self.live.feed(self.store):  # a peer's connection dropped, remade
                    self.notify(text, title="stiffmon", severity="warning")
            if self.replay is not None:
                self.replay.advance(self.store, dt)
            self.redraw(force=self.check_health())

    def health(self, rd: RunData, now: float | None = None) -> Health:
        """A run's health; a replayed run without a bye has ended when its replay has and its
        writer does not run (a followed one, or a live one gone quiet: when the process writing
        it is gone, on this machine)."""
        replay = self.replay
        at_end = replay is not None and 0 < len(replay.messages) <= replay.position
        follow = at_end and replay is not None and replay.follow
        now = self.clock() if now is None else now
        quiet = replay is None and rd.status(now) == "stalled"
        writer = None
        if (at_end or quiet) and rd.hello is not None and not rd.finished:
            writer = self._writers.state(rd.hello.host, rd.hello.pid, rd.hello.t)
        elif follow:
            writer = "unknown"
        return rd.health(now, ended=at_end and not follow, writer=writer)

    def check_health(self) -> bool:
        """Log and notify state changes and new problems; True when anything changed."""
        now = self.clock()
        changed = False
        for rd in self.store.runs.values():
            if self._health_of.get(rd.run) is not rd:  # new, or rebuilt by a replay seek back:
                self._health_of[rd.run] = rd  # its monitor log restarts with the data
                self._health.pop(rd.run, None)
                self.monitor_events.pop(rd.run, None)
                self._events_seen.pop(rd.run, None)
            seen, news = chrome.event_news(
                rd, self._events_seen.get(rd.run, 0), self._said.setdefault(rd.run, set())
            )
            self._events_seen[rd.run] = seen
            for level, text in news:  # the agent's own warnings: each kind once per run
                self.notify(f"{rd.name}: {text}", title="stiffmon", severity=SEVERITY[level])
            h, old = self.health(rd, now), self._health.get(rd.run)
            if old == h:
                continue
            changed = True
            self._health[rd.run] = h
            for level, text in chrome.changes(old, h):
                step, t = chrome.when(rd, text, now)
                self.monitor_events.setdefault(rd.run, []).append(
                    p.Event(rd.run, 0, step, t, level=level, code="monitor", message=text)
                )
                if level != "info" or (old is None and self.replay is None and self._checked):
                    self.notify(f"{rd.name}: {text}", title="stiffmon", severity=SEVERITY[level])
        self._checked = True  # runs there at the start are not news; later ones are
        return changed

    def redraw(self, force: bool = False) -> None:
        """Refresh the visible widgets if the store moved (or ``force``)."""
        self.query_one("#title", Static).update(chrome.title(self))
        self.query_one("#status", Static).update(chrome.status(self))
        if not force and self.store.version == self._drawn_version:
            return
        self._drawn_version = self.store.version
        has_runs = bool(self.store.runs)
        self.query_one("#views").display = has_runs
        self.query_one("#runs").display = has_runs
        self.query_one("#empty").display = not has_runs
        if not has_runs:
            self.query_one("#empty", Static).update(chrome.empty_message(self))
            return
        self.sort_runs()
        self.query_one("#runs", RunPanel).show(
            chrome.run_rows(self), ascii=self.ascii, no_color=self.no_color
        )
        self.views[self.view_name].refresh()

    # ------------------------------------------------------------------ used by the views

    def _current_range(self) -> tuple[float, float] | None:
        with contextlib.suppress(NoMatches):
            for w in self.query_one(f"#{self.view_name}").query(ChartView):
                rng = w.plot_range()
                if rng is not None:
                    return rng
        return None

    def zoom(
        self, factor: float, at: float | None = None, rng: tuple[float, float] | None = None
    ) -> None:
        """Zoom the x axis by ``factor`` (< 1: in) around ``at`` (default: the middle)."""
        rng = self.x_window or rng or self._current_range()
        if rng is None or not self.views[self.view_name].zoomable:
            return
        x0, x1 = rng
        mid = (x0 + x1) / 2 if at is None else at
        if factor > 1 and self.x_window is not None and (x1 - x0) * factor > 1e12:
            return
        self.set_window((mid - (mid - x0) * factor, mid + (x1 - mid) * factor))

    def set_window(self, window: tuple[float, float] | None) -> None:
        if window is not None and not window[1] - window[0] > 1e-9:
            return
        self.x_window = window
        self.redraw(force=True)

    def set_cursor(self, x: float | None) -> None:
        self.cursor_x = None if x is None else (x if self.x_time else float(round(x)))
        self.redraw(force=True)

    # ------------------------------------------------------------------ actions

    def action_view(self, name: str) -> None:
        self.view_name = name
        self.query_one("#views", ContentSwitcher).current = name
        self.redraw(force=True)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_zoom(self, factor: float) -> None:
        self.zoom(factor, self.cursor_x)

    def action_pan(self, direction: int) -> None:
        rng = self.x_window or self._current_range()
        if rng is not None and self.x_window is not None:
            shift = (rng[1] - rng[0]) / 4 * direction
            self.set_window((rng[0] + shift, rng[1] + shift))

    def action_move_cursor(self, direction: int) -> None:
        rng = self.x_window or self._current_range()
        if rng is None:
            return
        if self.cursor_x is None:
            self.set_cursor((rng[0] + rng[1]) / 2)
        else:
            step = max(1.0 if not self.x_time else 0.0, (rng[1] - rng[0]) / 40)
            self.set_cursor(min(rng[1], max(rng[0], self.cursor_x + direction * step)))

    def action_reset_zoom(self) -> None:
        self.x_window = self.cursor_x = None
        self.redraw(force=True)

    def action_flip(self, attr: str) -> None:
        setattr(self, attr, not getattr(self, attr))
        if attr == "x_time":
            self.x_window = self.cursor_x = None
        self.redraw(force=True)

    def action_smoothing(self) -> None:
        self.smooth_i = (self.smooth_i + 1) % len(SMOOTHING)
        self.redraw(force=True)

    def action_block(self) -> None:
        self.block_i = (self.block_i + 1) % len(BLOCKS)
        self.redraw(force=True)

    def action_cos_sign(self) -> None:
        self.kind = "sign" if self.kind == "cos" else "cos"
        self.redraw(force=True)

    def action_metric(self) -> None:
        self.metric_i = (self.metric_i + 1) % len(self.views["compare"].metrics())  # type: ignore[attr-defined]
        self.redraw(force=True)

    def action_log_level(self) -> None:
        self.log_level = LEVELS[(LEVELS.index(self.log_level) + 1) % len(LEVELS)]
        self.redraw(force=True)

    def action_log_filter(self) -> None:
        self.action_view("log")
        self.query_one("#log-filter", Input).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.log_text = event.value
        self.redraw(force=True)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.set_focus(None)

    def action_cursor(self, dr: int, dc: int) -> None:
        self.cursor = (max(0, self.cursor[0] + dr), max(0, self.cursor[1] + dc))
        self.redraw(force=True)

    def action_select_run(self, direction: int) -> None:
        if self.store.runs:
            self.selected = (self.selected + direction) % len(self.store.runs)
            self.scrub = None
        self.redraw(force=True)

    def sort_runs(self) -> None:
        """Put the store's runs in ``run_order`` (the run list, ``[``/``]`` and every view go
        by it), keeping the selected run selected."""
        self.store.runs, self.selected = sorted_runs(self.store.runs, self.run_order, self.selected)

    def action_order(self) -> None:
        self.run_order = RUN_ORDERS[(RUN_ORDERS.index(self.run_order) + 1) % len(RUN_ORDERS)]
        self.sort_runs()
        self.notify(f"runs in {self.run_order} order", title="stiffmon")
        self.redraw(force=True)

    def action_toggle_run(self) -> None:
        rd = self.views["overview"].selected_run()
        if rd is not None:
            rd.visible = not rd.visible
        self.redraw(force=True)

    def action_screenshot(self, filename: str | None = None, path: str | None = None) -> None:
        name = filename or f"stiffmon-{self.view_name}-{time.strftime('%Y%m%d-%H%M%S')}.svg"
        path = self.save_screenshot(filename=name, path=path or str(self.screenshot_dir))
        self.notify(f"screenshot saved: {path}", title="stiffmon")

    def action_redraw(self) -> None:
        self.refresh(layout=True)
        self.redraw(force=True)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:  # type: ignore[type-arg]
        """The command palette (Ctrl+P): the app's views, runs and toggles, then Textual's."""
        yield from chrome.commands(self)
        yield from super().get_system_commands(screen)
