"""What every view shares: run colours, the chart widget (mouse zoom, pan and cursor), and the
functions that turn a run's series into chart lines under the app's toggles."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from rich.color import Color
from rich.console import RenderableType
from rich.text import Text
from textual import events
from textual.widget import Widget

from stiffmon import derive
from stiffmon.marks import be_symbol
from stiffmon.store import RunData
from stiffmon.tui.renderables import HLine, Line, LineChart, Marker, XMark
from stiffmon.tui.renderables.linechart import NO_POSITIVE
from stiffmon.tui.runlines import run_line, series_x

if TYPE_CHECKING:
    from stiffmon.tui.app import StiffmonApp

PALETTE = (  # 20 hues told apart on a dark screen: the first 10 as before, then 10 more
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
    "#00c0ff",
    "#a0e000",
    "#ff5fd7",
    "#8787ff",
    "#ffaf00",
    "#00d7af",
    "#d75f00",
    "#afafff",
    "#5f8700",
    "#ff0087",
)
RUN_ORDERS = ("connect", "name", "lr")
"""The run list's orders (``o`` cycles them): as the runs connected, by name (natural: ``lr=0.01``
before ``lr=0.1`` before ``lr=1``), by learning rate (the run's first; unknown ones last)."""
SMOOTHING = (0.0, 0.6, 0.9, 0.99)
Builder = Callable[[int, int], RenderableType]
# which measurement produces a scalar (for the skipped-measurement marks on the x axis)
MEASURED_BY = {"sharpness": "sharpness", "stiffness": "gram", "noise": "gram", "xi": "gram"}


def run_color(rd: RunData) -> str:
    """Stable colour of a run: by order of appearance."""
    return PALETTE[rd.index % len(PALETTE)]


def natural_key(text: str) -> tuple[tuple[int, float, str], ...]:
    """Sort key of a name: its numbers by value (``1e-3``, ``0.01``, ``12``), the rest by text."""
    parts = re.split(r"(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)", text)
    return tuple(
        (0, float(p), "") if i % 2 else (1, 0.0, p.casefold()) for i, p in enumerate(parts) if p
    )


def first_lr(rd: RunData) -> float:
    """η of a run as it started (param group 0): its first ``lr/0``, else the hello's; NaN."""
    s = rd.scalars.get("lr/0")
    if s is not None and len(s.values) and math.isfinite(s.values[0]):
        return float(s.values[0])
    lr = rd.optimizer.get("lr")
    return float(lr) if isinstance(lr, (int, float)) and math.isfinite(lr) else math.nan


def ordered(runs: list[RunData], order: str) -> list[RunData]:
    """``runs`` in ``order`` (one of :data:`RUN_ORDERS`); ties and unknowns by connect order."""
    if order == "name":
        return sorted(runs, key=lambda rd: (natural_key(rd.name), rd.index))
    if order == "lr":
        lr = {rd.index: first_lr(rd) for rd in runs}
        return sorted(runs, key=lambda rd: (math.isnan(lr[rd.index]), lr[rd.index], rd.index))
    return sorted(runs, key=lambda rd: rd.index)


def sorted_runs(
    runs: dict[str, RunData], order: str, selected: int
) -> tuple[dict[str, RunData], int]:
    """``runs`` (run id -> data) in ``order`` and the index of the run at ``selected`` there
    (``runs`` itself where it is in order already)."""
    now = list(runs.values())
    want = ordered(now, order)
    if [rd.index for rd in want] == [rd.index for rd in now]:
        return runs, selected
    key = {id(rd): run for run, rd in runs.items()}
    chosen = now[selected % len(now)]
    return {key[id(rd)]: rd for rd in want}, want.index(chosen)


def capped(widget: Widget, lines: list[Text], more: Callable[[list[Text]], Text]) -> list[Text]:
    """``lines`` cut to the ``max-height`` the stylesheet gives ``widget``, the last line that
    fits saying what was left out (``more`` of the lines left out), so that nothing is dropped
    without a word. Unchanged where they fit or no height is set."""
    cap = widget.styles.max_height
    if cap is None or not cap.is_cells or len(lines) <= int(cap.value):
        return lines
    keep = max(0, int(cap.value) - 1)
    return [*lines[:keep], more(lines[keep:])]


def group_shade(color: str, j: int) -> str:
    """Shade ``j`` of a run's colour, for several curves of one run (param groups): 0 is the
    colour itself, then lighter and darker in turn, each further from it."""
    if j <= 0:
        return color
    r, g, b = Color.parse(color).get_truecolor()
    f = min(0.75, 0.45 + 0.15 * ((j - 1) // 2))
    towards = 255 if j % 2 else 0
    mix = [round(c + (towards - c) * f) for c in (r, g, b)]
    return "#{:02x}{:02x}{:02x}".format(*mix)


class ChartView(Widget):
    """A thin shell around a renderable built on demand; the mouse zooms, pans and points.

    Wheel: zoom the step axis around the pointer; drag: pan; click: put the cursor there.
    """

    DEFAULT_CSS = "ChartView { height: 1fr; min-height: 5; }"

    def __init__(self, build: Builder, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.build = build
        self.last: RenderableType | None = None
        self._drag: tuple[int, tuple[float, float]] | None = None

    def render(self) -> RenderableType:
        self.last = self.build(self.size.width, self.size.height)
        return self.last

    def data_x(self, col: int) -> float | None:
        """The x value under screen column ``col`` of the last drawn chart (None: not a chart)."""
        chart = self.last
        if not isinstance(chart, LineChart) or chart.plot_box is None:
            return None
        left, width, x0, x1 = chart.plot_box
        f = min(1.0, max(0.0, (col - left) / max(1, width - 1)))
        return x0 + f * (x1 - x0)

    def _app(self) -> StiffmonApp:
        app: StiffmonApp = self.app  # type: ignore[assignment]
        return app

    def on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        self._app().zoom(0.5, self.data_x(event.x), self.plot_range())
        event.stop()

    def on_mouse_scroll_down(self, event: events.MouseScrollDown) -> None:
        self._app().zoom(2.0, self.data_x(event.x), self.plot_range())
        event.stop()

    def plot_range(self) -> tuple[float, float] | None:
        chart = self.last
        if isinstance(chart, LineChart) and chart.plot_box is not None:
            return chart.plot_box[2], chart.plot_box[3]
        return None

    def on_mouse_down(self, event: events.MouseDown) -> None:
        rng = self.plot_range()
        if rng is not None:
            self._drag = (event.x, rng)
            self.capture_mouse()

    def on_mouse_move(self, event: events.MouseMove) -> None:
        if self._drag is None or not isinstance(self.last, LineChart):
            return
        x_start, (x0, x1) = self._drag
        box = self.last.plot_box
        if box is None or event.x == x_start:
            return
        shift = (x_start - event.x) / max(1, box[1] - 1) * (x1 - x0)
        self._app().set_window((x0 + shift, x1 + shift))

    def on_mouse_up(self, event: events.MouseUp) -> None:
        if self._drag is not None:
            moved = event.x != self._drag[0]
            self._drag = None
            self.release_mouse()
            if not moved:
                x = self.data_x(event.x)
                if x is not None:
                    self._app().set_cursor(x)


class View:
    """One screen of the monitor: a container of widgets and how to refresh them.

    Subclasses set ``name``, ``key`` and ``title`` and build their widgets in :meth:`widget`.
    """

    name: ClassVar[str] = ""
    key: ClassVar[str] = ""
    title: ClassVar[str] = ""
    zoomable: ClassVar[bool] = True  # the step axis zooms / pans / has a cursor

    def __init__(self, app: StiffmonApp) -> None:
        self.app = app

    def widget(self) -> Widget:
        raise NotImplementedError

    def refresh(self) -> None:
        """Redraw the view's charts (called when the store or a toggle changed)."""
        for w in self.app.query_one(f"#{self.name}").query(ChartView):
            w.refresh()

    # -------------------------------------------------------------- helpers for the charts

    def runs(self) -> list[RunData]:
        return [rd for rd in self.app.store.runs.values() if rd.visible]

    def xy(self, rd: RunData, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Series ``name`` of ``rd`` as chart coordinates under the app's toggles (x: step or
        time; smoothing); None without a finite value, which would draw no line (the chart
        says why instead: :meth:`why_empty`)."""
        s = rd.series(name)
        if s is None or not np.isfinite(s.values).any():
            return None
        x = series_x(rd, s.steps, s.times, self.app.x_time)
        y = s.values
        w = SMOOTHING[self.app.smooth_i]
        if w:
            y = np.asarray(derive.ema(y.tolist(), w))
        return x, y

    def x_of_step(self, rd: RunData, name: str, step: int) -> float:
        """Where ``step`` sits on the x axis (wall time when x is time)."""
        if not self.app.x_time:
            return float(step)
        s = rd.series(name)
        if s is None or not len(s):
            return math.nan
        i = min(len(s) - 1, int(np.searchsorted(s.steps, step)))
        return float(s.times[i] - rd.first_t)

    def run_line(
        self, rd: RunData, name: str, xy: tuple[np.ndarray, np.ndarray], color: str, label: str
    ) -> Line:
        """Series ``name`` of ``rd`` as a line whose read-out stops where the run's values stop
        being current (:func:`stiffmon.tui.runlines.run_line`)."""
        return run_line(rd, name, xy[0], xy[1], color, label, x_time=self.app.x_time)

    def skip_marks(self, rd: RunData, kind: str, name: str) -> list[XMark]:
        return [XMark(self.x_of_step(rd, name, st), "#e45756") for st in rd.skipped_at(kind)[-500:]]

    def chart(self, lines: list[Line], title: str, height: int, **kw: Any) -> LineChart:
        """A line chart under the app's toggles (log-y, ASCII, zoom window, cursor)."""
        app = self.app
        kw.setdefault("x_label", "seconds" if app.x_time else "step")
        runs = self.runs()
        if runs and "x_span" not in kw:  # one measurement so far: the axis spans the run
            last = max((rd.last_t - rd.first_t) if app.x_time else rd.last_step for rd in runs)
            kw["x_span"] = (0.0, float(last))
        return LineChart(
            lines,
            title=title,
            log_y=kw.pop("log_y", app.log_y),
            ascii=app.ascii,
            height=height,
            x_range=app.x_window if self.zoomable else None,
            cursor_x=app.cursor_x if self.zoomable else None,
            no_color=app.no_color,
            **kw,
        )

    def why_empty(self, name: str, title: str, yet: str | None = None) -> str:
        """What a chart of scalar ``name`` says without a line: ``yet`` (default ``no <title>
        yet``) while a visible run may still send a value, then ``run: why`` for each run that
        measured it NaN every time (:func:`never`); only those when every visible run did."""
        runs = self.runs()
        said = [f"{rd.name}: {why}" for rd in runs if (why := never(rd, (name,), title))]
        if len(said) < len(runs) or not runs:
            said.insert(0, yet or f"no {title} yet")
        return "\n".join(said)

    def metric_chart(
        self,
        name: str,
        title: str,
        ref: float | None = None,
        legend: bool = False,
        empty: Callable[[list[RunData], str], str] | None = None,
        what: str | None = None,
    ) -> Builder:
        """A chart of scalar ``name`` for every visible run (the run list is the legend).

        A run whose series has no finite value draws no line; without a line the chart says
        why (:meth:`why_empty`, about ``what``, default ``title``), and ``empty``, where given,
        turns that text and the visible runs into what to show instead (e.g. why the runs will
        never send one)."""
        kind = MEASURED_BY.get(name.split("/", 1)[0])
        what = what or title

        def build(width: int, height: int) -> RenderableType:
            lines, marks = [], []
            for rd in self.runs():
                xy = self.xy(rd, name)
                if xy is not None:
                    lines.append(self.run_line(rd, name, xy, run_color(rd), rd.name))
                    if kind is not None:
                        marks += self.skip_marks(rd, kind, name)
            hl = [HLine(ref, "grey50")] if ref is not None else []
            empty_text = f"no {what} yet"  # lines outside the zoom window
            if not lines:
                empty_text = self.why_empty(name, what)
                if empty is not None:
                    empty_text = empty(self.runs(), empty_text)
            return self.chart(
                lines,
                title,
                height,
                hlines=hl,
                legend=legend,
                x_marks=marks,
                empty_text=empty_text,
                log_empty_text=f"{what}: {NO_POSITIVE}",
            )

        return build

    def selected_run(self) -> RunData | None:
        runs = list(self.app.store.runs.values())  # in the run list's order (the app sorts it)
        return runs[self.app.selected % len(runs)] if runs else None


def never(rd: RunData, names: tuple[str, ...], title: str) -> str | None:
    """Why ``rd`` shows none of ``names``: each was measured and NaN every time (with the cause
    where the run's other scalars tell); None while one may still come.

    Args:
        rd: The run.
        names: The scalars (any one of them would be drawn).
        title: What they are called (``noise scale B_simple``, ``gradient tests``).

    Returns:
        ``no <title>: NaN at all <n> measurements (<cause>)``, or None.
    """
    series = [rd.series(n) for n in names]
    if any(s is None or not len(s) or np.isfinite(s.values).any() for s in series):
        return None
    n = max(len(s) for s in series if s is not None)
    cause = _cause(rd, names)
    return f"no {title}: NaN at all {n:,} measurements" + (f" ({cause})" if cause else "")


def _cause(rd: RunData, names: tuple[str, ...]) -> str | None:
    """What the Gram's noise scalars say about ``names`` being NaN, if they come from the Gram
    (noise, stiffness, ξ) and the run's scalars tell."""
    if any(MEASURED_BY.get(n.split("/", 1)[0]) != "gram" for n in names):
        return None
    trace = rd.series("noise/trace_k")
    if trace is not None and len(trace) and bool((trace.values == 0).all()):
        return "Tr K = 0 at every measurement: the per-example gradients are zero"
    grad_sq = rd.series("noise/grad_sq")
    if (
        "noise/b_simple" in names
        and grad_sq is not None
        and len(grad_sq)
        and bool((grad_sq.values <= 0).all())
    ):
        return "‖G‖² ≤ 0 at every measurement: the mean gradient is within its noise"
    return None


def be_marker(x: float, value: float, color: str, status: str, diverged: bool = False) -> Marker:
    """The break-even marker of ``status`` (:data:`stiffmon.marks.BREAK_EVEN_MARKS`: ◆ confirmed,
    ◇ tentative, ✕ tentative in a run that ``diverged``)."""
    return Marker(x, value, color, be_symbol(status, diverged))
