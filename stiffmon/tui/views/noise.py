"""Noise: Tr K, λ1_K, conditioning and the simple noise scale of every run; Cockpit's gradient
tests (θ_max, ν_max) of the selected run and the batch size they suggest next to the actual one.

A quantity that is NaN at every measurement of a run will never come: the chart says so, and
why where the run's other noise scalars tell (Tr K = 0: the per-example gradients are zero;
‖G‖² ≤ 0: the mean gradient is within its noise), instead of "no … yet" (the scalar charts by
:meth:`~stiffmon.tui.views.base.View.metric_chart`, as in every view; the gradient tests and the
suggested batch charts here say it the same way).
"""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text
from textual.containers import Grid
from textual.widget import Widget

from stiffmon.tui.curvature import batch_chart, batch_table, gradient_tests_chart
from stiffmon.tui.renderables.axes import fit_title
from stiffmon.tui.views.base import ChartView, View, never, run_color

TEST_KEYS = ("norm_test", "inner_product_test", "orthogonality_test")
MIN_CHART_ROWS = 5
"""Fewer rows than this left under the table: the suggested-batch chart is left out."""
BATCH_TITLE = "suggested batch (gradient tests)"


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
        why = never(rd, tuple(f"noise/{k}" for k in TEST_KEYS), "gradient tests")
        app = self.app
        return gradient_tests_chart(
            rd,
            x_time=app.x_time,
            log_y=app.log_y,
            ascii=app.ascii,
            height=height,
            empty_text=f"{rd.name}: {why}" if why else "no gradient tests yet",
        )

    def batch(self, width: int, height: int) -> RenderableType:
        """The suggested-batch chart over the table of every run's latest numbers; the table
        alone (under a title) where both do not fit, so that no run's line is cut off."""
        runs = [(rd, run_color(rd)) for rd in self.runs()]
        table = batch_table(runs, ascii=self.app.ascii)
        rows = len(table.renderables) if isinstance(table, Group) else 1
        if height - rows < MIN_CHART_ROWS:
            title = Text(fit_title(BATCH_TITLE, width, self.app.ascii), style="bold")
            return Group(title, table)
        chart = batch_chart(
            runs,
            "norm_test",
            x_time=self.app.x_time,
            ascii=self.app.ascii,
            height=height - rows,
            empty_text=self.why_empty("noise/suggested_batch/norm_test", "suggested batch"),
        )
        chart.no_color = self.app.no_color
        return Group(chart, table)
