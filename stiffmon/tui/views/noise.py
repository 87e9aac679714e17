"""Noise: Tr K, λ1_K, conditioning and the simple noise scale of every run; Cockpit's gradient
tests (θ_max, ν_max) of the selected run and the batch size they suggest next to the actual one."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text
from textual.containers import Grid
from textual.widget import Widget

from stiffmon.tui.curvature import batch_chart, batch_table, gradient_tests_chart
from stiffmon.tui.views.base import ChartView, View, run_color


class Noise(View):
    name = "noise"
    key = "5"
    title = "noise"

    def widget(self) -> Widget:
        return Grid(
            ChartView(self.metric_chart("noise/trace_k", "Tr K"), classes="chart"),
            ChartView(self.metric_chart("noise/lambda1_k", "λ1_K"), classes="chart"),
            ChartView(
                self.metric_chart("noise/conditioning", "conditioning λk/λ1"), classes="chart"
            ),
            ChartView(self.metric_chart("noise/b_simple", "noise scale B_simple"), classes="chart"),
            ChartView(self.tests, classes="chart"),
            ChartView(self.batch, classes="chart"),
            id=self.name,
            classes="grid23",
        )

    def tests(self, width: int, height: int) -> RenderableType:
        rd = self.selected_run()
        if rd is None:
            return Text("no runs yet", style="dim")
        app = self.app
        return gradient_tests_chart(
            rd, x_time=app.x_time, log_y=app.log_y, ascii=app.ascii, height=height
        )

    def batch(self, width: int, height: int) -> RenderableType:
        runs = [(rd, run_color(rd)) for rd in self.runs()]
        table = batch_table(runs, ascii=self.app.ascii)
        rows = len(table.renderables) if isinstance(table, Group) else 1
        chart = batch_chart(
            runs,
            "norm_test",
            x_time=self.app.x_time,
            ascii=self.app.ascii,
            height=max(5, height - rows),
        )
        return Group(chart, table)
