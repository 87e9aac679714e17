"""Training: accuracy, the learning-rate and momentum schedules (every param group) and the step
time of every run."""

from __future__ import annotations

from rich.console import RenderableType
from textual.containers import Grid
from textual.widget import Widget

from stiffmon.store import RunData
from stiffmon.tui.renderables import Line
from stiffmon.tui.renderables.linechart import NO_POSITIVE
from stiffmon.tui.views.base import Builder, ChartView, View, group_shade, run_color

ACCURACY_OFF = "accuracy-off"
"""Code of the agent's event saying why a run will never send an accuracy."""


def accuracy_off(rd: RunData) -> str:
    """Why the run will never send an accuracy (its ``accuracy-off`` event's text, e.g.
    ``no accuracy: step() gets no logits/targets …``); ``""`` when it has not said so."""
    for ev in reversed(rd.events):
        if ev.code == ACCURACY_OFF:
            return ev.message
    return ""


def no_accuracy_text(runs: list[RunData], default: str) -> str:
    """What the accuracy chart says without a line: why the runs will never send one (their
    ``accuracy-off`` events; ``run: why`` for each when they differ), after ``default`` (``no
    accuracy yet``) when one of them might still send it."""
    whys = [(rd.name, accuracy_off(rd)) for rd in runs]
    said = [(name, why) for name, why in whys if why]
    if not said:
        return default
    if len(said) == len(whys) and len({why for _, why in said}) == 1:
        return said[0][1]
    parts = [f"{name}: {why}" for name, why in said]
    return "; ".join(parts if len(said) == len(whys) else [default, *parts])


def group_chart(view: View, prefix: str, symbol: str, title: str) -> Builder:
    """``prefix/i`` (``lr/0``, ``lr/1``, …) of every param group of every visible run.

    One line per group, in shades of its run's colour (group 0 the run's own), with a legend
    ``lr g0``, ``lr g1`` (``run g1`` with several runs); groups whose values are the same at
    every step are one line (``lr g0,2``), and a run whose groups all agree is one line named
    after the run, as in the other charts.
    """

    def build(width: int, height: int) -> RenderableType:
        runs = [(rd, rd.distinct_groups(prefix)) for rd in view.runs()]
        runs = [(rd, groups) for rd, groups in runs if groups]
        multi = any(len(groups) > 1 for _, groups in runs)
        lines: list[Line] = []
        for rd, groups in runs:
            for j, members in enumerate(groups):
                name = f"{prefix}/{members[0]}"
                xy = view.xy(rd, name)
                if xy is None:
                    continue
                label = rd.name
                if len(groups) > 1:
                    g = "g" + ",".join(str(i) for i in members)
                    label = f"{symbol} {g}" if len(runs) == 1 else f"{rd.name} {g}"
                lines.append(view.run_line(rd, name, xy, group_shade(run_color(rd), j), label))
        full = f"{title} per param group" if multi else title
        return view.chart(
            lines,
            full,
            height,
            legend=multi,
            empty_text=f"no {title} yet",
            log_empty_text=f"{title}: {NO_POSITIVE}",
        )

    return build


class Training(View):
    name = "training"
    key = "7"
    title = "training"

    def widget(self) -> Widget:
        return Grid(
            ChartView(
                self.metric_chart("accuracy", "accuracy (train batch)", empty=no_accuracy_text),
                classes="chart",
            ),
            ChartView(group_chart(self, "lr", "lr", "learning rate η"), classes="chart"),
            ChartView(group_chart(self, "momentum", "β", "momentum β"), classes="chart"),
            ChartView(self.metric_chart("step_time", "step time (s)"), classes="chart"),
            id=self.name,
            classes="grid2",
        )
