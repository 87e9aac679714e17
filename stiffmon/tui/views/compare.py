"""Compare: the comparison table of every run and an overlay of one metric (``m`` cycles; the
user's ``custom/…`` scalars are in the cycle)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import RenderableType
from textual import events
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import Static

from stiffmon import derive
from stiffmon.store import RunData
from stiffmon.summary import run_summary
from stiffmon.tui.renderables.comparetable import compare_table, table_rows
from stiffmon.tui.views.base import ChartView, View, run_color
from stiffmon.tui.views.custom import custom_names
from stiffmon.tui.views.sharpness import SHARPNESS_SERIES

if TYPE_CHECKING:
    from stiffmon.tui.app import StiffmonApp

MIN_OVERLAY = 8
"""Rows the overlay chart keeps (title, five of plot, the x axis) before the legend gives way."""
TABLE_SHARE = 0.8
"""The share of the view's height the table may take (``max-height: 80%`` in app.tcss)."""
COMPARE_METRICS = (
    ("loss", "loss"),
    ("accuracy", "accuracy"),
    ("sharpness/lambda1_h", "λ1_H"),
    ("noise/lambda1_k", "λ1_K"),
    ("noise/trace_k", "Tr K"),
    ("stiffness/cos/train-train/within", "within-class stiffness"),
    ("stiffness/cos/train-val/within", "train–val stiffness"),
    ("xi/input", "ξ (input)"),
)


SUMMARY_SERIES = (*SHARPNESS_SERIES, "noise/lambda1_k", "noise/trace_k", "xi/input")


def summary_of(rd: RunData) -> dict[str, Any]:
    """``summary.run_summary``, computed again only when a measured series changed."""
    return rd.memoized("summary", rd.data_key(*SUMMARY_SERIES), lambda: run_summary(rd))


def fresh(app: StiffmonApp, rd: RunData, now: float, series: str) -> dict[str, Any]:
    """What changes every step: the last loss, η and β (a schedule moves them) and the state;
    the threshold is the one of ``series``, the λ1 the break-even was judged on, at its last
    measurement, with that measurement's step where η or β moved since: the table must not
    pass off a threshold computed from an earlier η as the one of the η it shows."""
    precond = series == "sharpness/lambda1_precond"
    thr_name = derive.threshold_series(precond)
    thr, thr_step = last_of(rd, thr_name)
    if thr_step is not None and not schedule_moved(rd, thr_step):
        thr_step = None
    return {
        "final_loss": rd.last("loss"),
        "lr": rd.lr,
        "lr_groups": len(rd.distinct_groups("lr")),
        "momentum": rd.momentum,
        "lr_over_batch": derive.lr_over_batch(rd.lr, rd.batch_size),
        "status": status_words(app, rd, now),
        "threshold_now": thr,
        "threshold_step": thr_step,
        "diverged": rd.diverged_step is not None,
    }


def last_of(rd: RunData, name: str) -> tuple[float, int | None]:
    """The last value of series ``name`` (NaN where no threshold applied) and its step; (NaN,
    None) before one."""
    s = rd.series(name)
    if s is None or not len(s):
        return math.nan, None
    return s.last(), int(s.steps[-1])


def schedule_moved(rd: RunData, step: int) -> bool:
    """Whether any param group's η or β at the run's last step differs from the one at
    ``step`` (the threshold's rule takes the most restrictive group, not always group 0)."""
    for name, s in rd.scalars.items():
        if not name.startswith(("lr/", "momentum/")) or not len(s):
            continue
        i = int(np.searchsorted(s.steps, step, side="right")) - 1
        then, now = (float(s.values[max(0, i)]), s.last())
        if math.isfinite(then) and math.isfinite(now) and not math.isclose(then, now, rel_tol=1e-6):
            return True
    return False


def status_words(app: StiffmonApp, rd: RunData, now: float) -> str:
    """``live``, ``finished``, ``diverged @19``, … for the table's status column."""
    if rd.diverged_step is not None:
        return f"diverged @{rd.diverged_step:,}"
    return app.health(rd, now).text


class CompareBox(Vertical):
    """The compare view's box. The table is laid out for the width it is given (runs as columns
    or as rows, what fits whole), not by the widget, so a resize must lay it out again: at once,
    not when new data arrives (a finished replay, a paused monitor)."""

    def __init__(self, view: Compare, *children: Widget, id: str) -> None:
        super().__init__(*children, id=id)
        self._compare = view

    def on_resize(self, event: events.Resize) -> None:
        self._compare.refresh()


class Compare(View):
    name = "compare"
    key = "6"
    title = "compare"

    def metrics(self) -> list[tuple[str, str]]:
        return [*COMPARE_METRICS, *((n, n) for n in custom_names(self))]

    def widget(self) -> Widget:
        return CompareBox(
            self, Static(id="compare-table"), ChartView(self.overlay, classes="chart"), id=self.name
        )

    def refresh(self) -> None:
        app = self.app
        now = app.clock()
        rows = []
        for rd in app.store.runs.values():
            s = summary_of(rd)
            rows.append((rd.name, run_color(rd), s | fresh(app, rd, now, s["break_even_series"])))
        table = self.app.query_one("#compare-table", Static)
        views = app.query_one("#views").size
        width = views.width - 2  # the table's own width is its content's
        # the legend gives way (cut with …) before the overlay gets fewer than MIN_OVERLAY rows
        room = views.height - MIN_OVERLAY - table_rows(len(rows), width, app.ascii)
        cap = int(views.height * TABLE_SHARE)  # the table's max-height in app.tcss
        table.update(
            compare_table(
                rows,
                width,
                ascii=app.ascii,
                legend_rows=max(1, room),
                max_rows=max(4, cap),
                selected=app.selected % max(1, len(rows)),
            )
        )
        super().refresh()

    def overlay(self, width: int, height: int) -> RenderableType:
        metrics = self.metrics()
        name, label = metrics[self.app.metric_i % len(metrics)]
        title = f"overlay: {label}   (m: next metric)"
        return self.metric_chart(name, title, what=label)(width, height)
