"""The stiffmon terminal monitor (Textual): six views over live or replayed runs.

Widgets are thin shells: each holds a function that builds a pure renderable
(:mod:`stiffmon.tui.renderables`) from the app's state, and a timer (10 Hz) refreshes only the
visible ones, only when the store changed. Sources ingest on worker threads.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical
from textual.css.query import NoMatches
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import ContentSwitcher, DataTable, Footer, Static

from stiffmon import __version__, derive
from stiffmon.store import RunData, Store
from stiffmon.summary import fmt, run_summary
from stiffmon.tui.renderables import Heatmap, HLine, Line, LineChart, Marker
from stiffmon.tui.sources import LiveSource, ReplaySource

PALETTE = (
    "#e45756",
    "#4c78a8",
    "#54a24b",
    "#f58518",
    "#b279a2",
    "#72b7b2",
    "#eeca3b",
    "#ff9da6",
    "#9d755d",
    "#bab0ac",
)
SMOOTHING = (0.0, 0.6, 0.9, 0.99)
SPEEDS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, math.inf)
BLOCKS = ("train-train", "train-val", "val-val")
VIEWS = ("overview", "stiffness", "distance", "sharpness", "noise", "compare")
COMPARE_METRICS = (
    ("loss", "loss"),
    ("sharpness/lambda1_h", "λ1_H"),
    ("noise/lambda1_k", "λ1_K"),
    ("noise/trace_k", "Tr K"),
    ("stiffness/cos/train-train/within", "within-class stiffness"),
    ("stiffness/cos/train-val/within", "train–val stiffness"),
    ("xi/input", "ξ (input)"),
)


KEY_NAMES = {
    "question_mark": "?",
    "left_square_bracket": "[",
    "right_square_bracket": "]",
    "plus,equals_sign": "+",
    "minus": "-",
    "left": "←",
    "right": "→",
}


def run_color(rd: RunData) -> str:
    """Stable colour of a run: by order of appearance."""
    return PALETTE[rd.index % len(PALETTE)]


class ChartView(Widget):
    """A thin shell around a renderable built on demand."""

    DEFAULT_CSS = "ChartView { height: 1fr; min-height: 6; }"

    def __init__(self, build: Callable[[int, int], RenderableType], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.build = build

    def render(self) -> RenderableType:
        return self.build(self.size.width, self.size.height)


class HelpScreen(ModalScreen[None]):
    """Key help generated from the app's bindings."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,question_mark", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        keys = [
            (KEY_NAMES.get(b.key, b.key), b.description)
            for b in self.app.BINDINGS
            if isinstance(b, Binding)
        ]
        half = (len(keys) + 1) // 2
        table = Table(
            title=f"stiffmon {__version__} — keys (esc closes)", box=None, header_style="bold"
        )
        for _ in range(2):
            table.add_column("key", style="bold cyan", no_wrap=True)
            table.add_column("action", no_wrap=True)
        for i in range(half):
            right = keys[i + half] if i + half < len(keys) else ("", "")
            table.add_row(*keys[i], *right)
        yield Static(table, id="help-table")


class StiffmonApp(App[None]):
    """The monitor. Give it a live source, a replay source, or neither (a store fed by tests)."""

    CSS_PATH = "app.tcss"
    TITLE = "stiffmon"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("1", "view('overview')", "overview"),
        Binding("2", "view('stiffness')", "stiffness"),
        Binding("3", "view('distance')", "distance"),
        Binding("4", "view('sharpness')", "sharpness"),
        Binding("5", "view('noise')", "noise"),
        Binding("6", "view('compare')", "compare"),
        Binding("question_mark", "help", "help"),
        Binding("q", "quit", "quit"),
        Binding("space", "pause", "pause / play"),
        Binding("left", "scrub(-1)", "earlier measurement", show=False),
        Binding("right", "scrub(1)", "later measurement", show=False),
        Binding("home", "seek_end(0)", "replay: start", show=False),
        Binding("end", "seek_end(1)", "replay: end", show=False),
        Binding("plus,equals_sign", "speed(1)", "replay faster", show=False),
        Binding("minus", "speed(-1)", "replay slower", show=False),
        Binding("l", "toggle_log", "log-y"),
        Binding("s", "smoothing", "smoothing"),
        Binding("x", "x_axis", "x: step/time"),
        Binding("b", "block", "stiffness block", show=False),
        Binding("c", "cos_sign", "cosine / sign", show=False),
        Binding("m", "metric", "compare metric", show=False),
        Binding("shift+left", "cursor(0,-1)", "heatmap cursor left", show=False),
        Binding("shift+right", "cursor(0,1)", "heatmap cursor right", show=False),
        Binding("shift+up", "cursor(-1,0)", "heatmap cursor up", show=False),
        Binding("shift+down", "cursor(1,0)", "heatmap cursor down", show=False),
        Binding("left_square_bracket", "select_run(-1)", "previous run", show=False),
        Binding("right_square_bracket", "select_run(1)", "next run", show=False),
        Binding("t", "toggle_run", "show / hide run", show=False),
        Binding("e", "screenshot", "SVG screenshot"),
        Binding("ctrl+l", "redraw", "redraw", show=False),
    ]

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
        self.live = live
        self.replay = replay
        self.ascii = ascii
        self.screenshot_dir = screenshot_dir or Path.cwd()
        self.clock = clock
        self.view_name = "overview"
        self.log_y = False
        self.smooth_i = 0
        self.x_time = False
        self.block_i = 0
        self.kind = "cos"
        self.metric_i = 0
        self.paused = False
        self.selected = 0
        self.scrub: int | None = None  # measurement index in the stiffness / distance views
        self.cursor = (0, 0)
        self._drawn_version = -1
        self._last_tick = time.monotonic()
        self.shoot_views = shoot_views  # save an SVG of every view into screenshot_dir, then exit
        self.shots: list[Path] = []

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Static(id="title")
        with Horizontal(id="body"):
            yield Static(id="runs")
            with ContentSwitcher(initial="overview", id="views"):
                with Grid(id="overview", classes="grid2"):
                    yield ChartView(self._metric_chart("loss", "loss"), classes="chart")
                    yield ChartView(self._sharpness_chart(compact=True), classes="chart")
                    yield ChartView(
                        self._metric_chart(
                            "stiffness/cos/train-train/within", "within-class stiffness", ref=0.0
                        ),
                        classes="chart",
                    )
                    yield ChartView(
                        self._metric_chart("noise/trace_k", "Tr K (gradient noise)"),
                        classes="chart",
                    )
                with Vertical(id="stiffness"):
                    yield ChartView(self._heatmap, id="heatmap")
                with Vertical(id="distance"):
                    yield ChartView(self._distance_curve, classes="chart")
                    yield ChartView(
                        self._metric_chart(
                            "xi/input", "critical length ξ (input space) over training"
                        ),
                        classes="chart",
                    )
                with Vertical(id="sharpness"):
                    yield ChartView(self._sharpness_chart(compact=False), classes="chart")
                with Grid(id="noise", classes="grid2"):
                    yield ChartView(self._metric_chart("noise/trace_k", "Tr K"), classes="chart")
                    yield ChartView(self._metric_chart("noise/lambda1_k", "λ1_K"), classes="chart")
                    yield ChartView(
                        self._metric_chart("noise/conditioning", "conditioning λk/λ1"),
                        classes="chart",
                    )
                    yield ChartView(
                        self._metric_chart("noise/b_simple", "noise scale B_simple"),
                        classes="chart",
                    )
                with Vertical(id="compare"):
                    yield DataTable(id="compare-table", zebra_stripes=True, cursor_type="row")
                    yield ChartView(self._compare_chart, classes="chart")
            yield Static(id="empty")
        yield Static(id="status")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#compare-table", DataTable)
        table.can_focus = False  # the app's keys (arrows, home, end, space) stay the app's
        for col in (
            "run",
            "η",
            "B",
            "β",
            "η/B",
            "break-even",
            "peak λ1_H",
            "peak λ1_K",
            "ξ",
            "loss",
            "status",
        ):
            table.add_column(col, key=col)
        if self.live is not None:
            self.run_worker(self.live.run, thread=True, exclusive=False, name="live")
        if self.replay is not None:
            if not self.replay.messages:
                self.replay.load()
            self.replay.seek(self.store, len(self.replay.messages))  # open at the end, paused
            if self.replay.follow:
                self.replay.playing = True
                self.run_worker(self.replay.follow_loop, thread=True, name="follow")
        self.set_interval(0.1, self.tick)
        self.tick()
        if self.shoot_views:
            self.call_after_refresh(self._shoot, 0)

    def _shoot(self, i: int) -> None:
        """Save view ``i`` (after it has been drawn), then go on to the next one or exit."""
        if i > 0:
            name = f"{VIEWS.index(self.view_name) + 1}-{self.view_name}.svg"
            self.shots.append(
                Path(self.save_screenshot(filename=name, path=str(self.screenshot_dir)))
            )
        if i == len(VIEWS):
            self.exit()
            return
        self.action_view(VIEWS[i])
        self.set_timer(0.3, lambda: self._shoot(i + 1))

    def on_unmount(self) -> None:
        if self.live is not None:
            self.live.stop.set()
        if self.replay is not None:
            self.replay.stop.set()

    # ------------------------------------------------------------------ the 10 Hz tick

    def tick(self) -> None:
        with contextlib.suppress(NoMatches):  # the screen is being torn down (or not built yet)
            self._tick()

    def _tick(self) -> None:
        now = time.monotonic()
        dt, self._last_tick = now - self._last_tick, now
        if self.live is not None and not self.paused:
            self.store.extend(self.live.drain())
            self.store.malformed = self.live.malformed
        if self.replay is not None:
            self.replay.advance(self.store, dt)
        self.redraw()

    def redraw(self, force: bool = False) -> None:
        """Refresh the visible widgets if the store moved (or ``force``)."""
        self._update_chrome()
        if not force and self.store.version == self._drawn_version:
            return
        self._drawn_version = self.store.version
        has_runs = bool(self.store.runs)
        self.query_one("#views").display = has_runs
        self.query_one("#empty").display = not has_runs
        if not has_runs:
            self.query_one("#empty", Static).update(self._empty_message())
            return
        self.query_one("#runs", Static).update(self._run_list())
        view = self.query_one(f"#{self.view_name}")
        for w in view.query(ChartView):
            w.refresh()
        if self.view_name == "compare":
            self._fill_compare()

    def _update_chrome(self) -> None:
        mode = "ascii " if self.ascii else ""
        flags = []
        if self.log_y:
            flags.append("log-y")
        if SMOOTHING[self.smooth_i]:
            flags.append(f"smoothing {SMOOTHING[self.smooth_i]:g}")
        flags.append("x: time" if self.x_time else "x: step")
        title = Text.assemble(
            ("stiffmon ", "bold"),
            (f"{mode}— ", "dim"),
            (f"{VIEWS.index(self.view_name) + 1} {self.view_name}", "bold cyan"),
            ("   " + "  ".join(flags), "dim"),
        )
        self.query_one("#title", Static).update(title)
        parts = []
        if self.live is not None:
            parts.append(self.live.describe() + (" (paused)" if self.paused else ""))
            if self.live.error:
                parts.append(f"error: {self.live.error}")
        if self.replay is not None:
            parts.append(self.replay.describe())
            parts += self.replay.notes[:1]
        parts.append(f"malformed {self.store.malformed}")
        self.query_one("#status", Static).update(Text("  │  ".join(parts), style="dim"))

    def _empty_message(self) -> Text:
        lines = [
            ("Nothing connected yet.\n\n", "bold"),
            (
                "Waiting for runs on: "
                + (
                    ", ".join(map(str, self.live.endpoints))
                    if self.live and self.live.endpoints
                    else "no endpoint (no local runs found)"
                )
                + "\n\n",
                "",
            ),
            ("In your training script:\n", "dim"),
            (
                "    from stiffmon_agent import Agent\n"
                "    agent = Agent(model, loss_fn, optimizer, probe=(x, y))\n"
                "    ...\n    agent.step(loss)\n\n",
                "cyan",
            ),
            (
                "Then: stiffmon watch  |  stiffmon watch tcp://host:5555  |  stiffmon watch ssh://user@host\n",
                "dim",
            ),
            ("Or try: stiffmon demo   /   stiffmon replay demos/sessions/*.stiff", "dim"),
        ]
        return Text.assemble(*lines)

    def _run_list(self) -> Table:
        table = Table(box=None, show_header=False, pad_edge=False, expand=True)
        table.add_column("", width=2)
        table.add_column("run", ratio=1, overflow="ellipsis", no_wrap=True)
        table.add_column("st", width=4)
        now = self.clock()
        for i, rd in enumerate(self.store.runs.values()):
            sym = "■" if rd.visible else "□"
            style = "reverse" if i == self.selected else ""
            status = rd.status(now)
            st = {"live": "●", "stalled": "◌", "finished": "✓", "replay": "▷"}[status]
            table.add_row(
                Text(sym, style=run_color(rd)),
                Text(rd.name, style=style),
                Text(f"{st} {status[:4]}", style="dim"),
            )
            table.add_row("", Text(f"step {rd.last_step:,}", style="dim"), "")
        return table

    # ------------------------------------------------------------------ chart builders

    def _runs(self) -> list[RunData]:
        return [rd for rd in self.store.runs.values() if rd.visible]

    def _selected_run(self) -> RunData | None:
        runs = list(self.store.runs.values())
        return runs[self.selected % len(runs)] if runs else None

    def _xy(self, rd: RunData, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        s = rd.series(name)
        if s is None or not len(s):
            return None
        x = (s.times - rd.first_t) if self.x_time else s.steps.astype(np.float64)
        y = s.values
        w = SMOOTHING[self.smooth_i]
        if w:
            y = np.asarray(derive.ema(y.tolist(), w))
        return x, y

    def _metric_chart(
        self, name: str, title: str, ref: float | None = None
    ) -> Callable[[int, int], RenderableType]:
        def build(width: int, height: int) -> RenderableType:
            lines = []
            for rd in self._runs():
                xy = self._xy(rd, name)
                if xy is not None:
                    lines.append(Line(xy[0], xy[1], run_color(rd), rd.name))
            hl = [HLine(ref, "grey50")] if ref is not None else []
            return LineChart(
                lines,
                hlines=hl,
                title=title,
                log_y=self.log_y,
                ascii=self.ascii,
                height=height,
                x_label="seconds" if self.x_time else "step",
                empty_text=f"no {title} yet",
            )

        return build

    def _sharpness_chart(self, compact: bool) -> Callable[[int, int], RenderableType]:
        def build(width: int, height: int) -> RenderableType:
            lines, hlines, markers = [], [], []
            for rd in self._runs():
                xy = self._xy(rd, "sharpness/lambda1_h")
                if xy is None:
                    continue
                c = run_color(rd)
                lines.append(Line(xy[0], xy[1], c, rd.name))
                thr = rd.last("sharpness/threshold")
                if math.isfinite(thr):
                    hlines.append(HLine(thr, c))
                be = rd.break_even()
                if be.step is not None:
                    s = rd.series("sharpness/lambda1_h")
                    assert s is not None
                    i = int(np.searchsorted(s.steps, be.step))
                    bx = (
                        float(s.times[i] - rd.first_t)
                        if self.x_time and i < len(s)
                        else float(be.step)
                    )
                    markers.append(Marker(bx, be.value, c))
            title = (
                "λ1_H (sharpness)"
                if compact
                else "λ1_H per run — dashed: stability threshold (2/η, momentum-adj.), ◆ break-even"
            )
            return LineChart(
                lines,
                hlines,
                markers,
                title=title,
                log_y=self.log_y,
                ascii=self.ascii,
                height=height,
                x_label="seconds" if self.x_time else "step",
                empty_text="no sharpness measurement yet",
            )

        return build

    def _measurements(self, rd: RunData, name: str, table: str) -> list[Any]:
        found: list[Any] = getattr(rd, table).get(name, [])
        return found

    def _scrubbed(self, snaps: list[Any]) -> tuple[Any, int]:
        if not snaps:
            return None, -1
        i = len(snaps) - 1 if self.scrub is None else max(0, min(self.scrub, len(snaps) - 1))
        return snaps[i], i

    def _heatmap(self, width: int, height: int) -> RenderableType:
        rd = self._selected_run()
        block = BLOCKS[self.block_i]
        if rd is None:
            return Text("no runs")
        snaps = self._measurements(rd, f"stiffness/{self.kind}/{block}", "matrices")
        snap, i = self._scrubbed(snaps)
        if snap is None:
            return Text(
                f"{rd.name}: no {self.kind} stiffness for {block} yet (b: block, c: cos/sign)",
                style="dim",
            )
        m = snap.msg
        k = m.data.shape[0]
        self.cursor = (min(self.cursor[0], k - 1), min(self.cursor[1], m.data.shape[1] - 1))
        cw = max(2, min(6, (width - 10) // max(1, m.data.shape[1])))

        def f(key: str) -> str:
            v = m.attrs.get(key)
            return "—" if not isinstance(v, int | float) else format(v, "+.3f")

        title = (
            f"{rd.name} — {self.kind} stiffness, {block}\n"
            f"measurement {i + 1}/{len(snaps)} at step {snap.step:,}   "
            f"within {f('within')}  between {f('between')}"
        )
        hm = Heatmap(
            m.data,
            m.row_labels,
            m.col_labels,
            cursor=self.cursor,
            title=title,
            ascii=self.ascii,
            cell_width=cw,
            half_block=height < k + 9,  # one line per class when there is room
        )
        hint = Text("←/→ measurement  shift+arrows cell  b block  c cos/sign  [ ] run", style="dim")
        return Group(hm, hint)

    def _distance_curve(self, width: int, height: int) -> RenderableType:
        rd = self._selected_run()
        if rd is None:
            return Text("no runs")
        lines, markers = [], []
        step = None
        for j, (name, snaps) in enumerate(sorted(rd.curves.items())):
            snap, _ = self._scrubbed(snaps)
            if snap is None:
                continue
            c = PALETTE[(rd.index + j) % len(PALETTE)]
            space = name.split("/", 1)[-1]
            lines.append(
                Line(snap.msg.x.astype(np.float64), snap.msg.y.astype(np.float64), c, space)
            )
            xi = snap.msg.attrs.get("xi")
            if isinstance(xi, int | float):
                markers.append(Marker(float(xi), 0.0, c))
            step = snap.step
        spaces = ", ".join(ln.label for ln in lines)
        title = (
            f"{rd.name} — stiffness vs distance ({spaces}) at step {step:,}, ◆ critical length ξ"
            if lines
            else ""
        )
        return LineChart(
            lines,
            [HLine(0.0, "grey50")],
            markers,
            title=title,
            ascii=self.ascii,
            height=height,
            x_label="distance (unit-normalised)",
            empty_text="no stiffness-vs-distance curve yet",
        )

    def _compare_chart(self, width: int, height: int) -> RenderableType:
        name, label = COMPARE_METRICS[self.metric_i]
        return self._metric_chart(name, f"overlay: {label}   (m: next metric)")(width, height)

    def _fill_compare(self) -> None:
        table = self.query_one("#compare-table", DataTable)
        table.clear()
        now = self.clock()
        for rd in self.store.runs.values():
            s = run_summary(rd, now)
            be = s["break_even_step"]
            table.add_row(
                Text(rd.name, style=run_color(rd)),
                fmt(s["lr"], ".3g"),
                str(s["batch_size"] or "—"),
                fmt(s["momentum"], ".2g"),
                fmt(s["lr_over_batch"], ".3g"),
                "—"
                if be is None
                else f"{be:,}" + (" (peak)" if s["break_even_reason"] == "peak" else ""),
                fmt(s["peak_lambda1_h"], ".3g"),
                fmt(s["peak_lambda1_k"], ".3g"),
                fmt(s["xi"], ".2f"),
                fmt(s["final_loss"], ".3g"),
                s["status"],
            )

    # ------------------------------------------------------------------ actions

    def action_view(self, name: str) -> None:
        self.view_name = name
        self.query_one("#views", ContentSwitcher).current = name
        self.redraw(force=True)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_pause(self) -> None:
        if self.replay is not None:
            if not self.replay.playing and self.replay.position >= len(self.replay.messages):
                self.replay.seek(self.store, 0)  # at the end: play from the start
            self.replay.playing = not self.replay.playing
        else:
            self.paused = not self.paused
        self.redraw(force=True)

    def action_scrub(self, direction: int) -> None:
        if self.replay is not None and self.view_name not in ("stiffness", "distance"):
            self.replay.playing = False
            self.replay.step_measurement(self.store, direction)
        else:
            rd = self._selected_run()
            if rd is None:
                return
            n = max((len(v) for v in (*rd.matrices.values(), *rd.curves.values())), default=0)
            cur = n - 1 if self.scrub is None else self.scrub
            nxt = max(0, min(n - 1, cur + direction))
            self.scrub = None if nxt >= n - 1 else nxt
        self.redraw(force=True)

    def action_seek_end(self, end: int) -> None:
        if self.replay is not None:
            self.replay.playing = False
            self.replay.seek(self.store, len(self.replay.messages) if end else 0)
        self.scrub = None
        self.redraw(force=True)

    def action_speed(self, direction: int) -> None:
        replay = self.replay
        if replay is None:
            return

        def distance(j: int) -> float:
            a, b = SPEEDS[j], replay.speed
            if math.isfinite(a) and math.isfinite(b):
                return abs(math.log(a) - math.log(b))
            return 0.0 if a == b else 99.0

        i = min(range(len(SPEEDS)), key=distance)
        replay.speed = SPEEDS[max(0, min(len(SPEEDS) - 1, i + direction))]
        self.redraw(force=True)

    def action_toggle_log(self) -> None:
        self.log_y = not self.log_y
        self.redraw(force=True)

    def action_smoothing(self) -> None:
        self.smooth_i = (self.smooth_i + 1) % len(SMOOTHING)
        self.redraw(force=True)

    def action_x_axis(self) -> None:
        self.x_time = not self.x_time
        self.redraw(force=True)

    def action_block(self) -> None:
        self.block_i = (self.block_i + 1) % len(BLOCKS)
        self.redraw(force=True)

    def action_cos_sign(self) -> None:
        self.kind = "sign" if self.kind == "cos" else "cos"
        self.redraw(force=True)

    def action_metric(self) -> None:
        self.metric_i = (self.metric_i + 1) % len(COMPARE_METRICS)
        self.redraw(force=True)

    def action_cursor(self, dr: int, dc: int) -> None:
        self.cursor = (max(0, self.cursor[0] + dr), max(0, self.cursor[1] + dc))
        self.redraw(force=True)

    def action_select_run(self, direction: int) -> None:
        if self.store.runs:
            self.selected = (self.selected + direction) % len(self.store.runs)
            self.scrub = None
        self.redraw(force=True)

    def action_toggle_run(self) -> None:
        rd = self._selected_run()
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
