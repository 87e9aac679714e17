"""Curvature: the Hessian spectral density of a chosen measurement (←/→) and its evolution as a
step × eigenvalue map in log colour, the Hessian trace with its error band, and the top-k
eigenvalues over training, for the selected run (the trace for every run)."""

from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text
from textual.containers import Grid
from textual.widget import Widget

from stiffmon.tui.curvature import density_chart, density_map, topk_chart, trace_chart
from stiffmon.tui.views.base import ChartView, View, run_color

NO_RUNS = Text("no runs yet", style="dim")


class Curvature(View):
    name = "curvature"
    key = "h"
    title = "curvature"
    zoomable = False

    def widget(self) -> Widget:
        return Grid(
            ChartView(self.density, classes="chart"),
            ChartView(self.evolution, classes="chart"),
            ChartView(self.trace, classes="chart"),
            ChartView(self.topk, classes="chart"),
            id=self.name,
            classes="grid2",
        )

    def density(self, width: int, height: int) -> RenderableType:
        rd = self.selected_run()
        if rd is None:
            return NO_RUNS
        return density_chart(
            rd, self.app.scrub, log_y=self.app.log_y, ascii=self.app.ascii, height=height
        )

    def evolution(self, width: int, height: int) -> RenderableType:
        rd = self.selected_run()
        if rd is None:
            return NO_RUNS
        return density_map(rd, ascii=self.app.ascii, height=height)

    def trace(self, width: int, height: int) -> RenderableType:
        runs = [(rd, run_color(rd)) for rd in self.runs()]
        chart = trace_chart(
            runs, x_time=self.app.x_time, log_y=self.app.log_y, ascii=self.app.ascii, height=height
        )
        chart.no_color = self.app.no_color
        return chart

    def topk(self, width: int, height: int) -> RenderableType:
        rd = self.selected_run()
        if rd is None:
            return NO_RUNS
        chart = topk_chart(
            rd, x_time=self.app.x_time, log_y=self.app.log_y, ascii=self.app.ascii, height=height
        )
        chart.no_color = self.app.no_color
        return chart
