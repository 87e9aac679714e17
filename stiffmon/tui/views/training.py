"""Training: accuracy, the learning-rate and momentum schedules and the step time of every run."""

from __future__ import annotations

from textual.containers import Grid
from textual.widget import Widget

from stiffmon.tui.views.base import ChartView, View


class Training(View):
    name = "training"
    key = "7"
    title = "training"

    def widget(self) -> Widget:
        return Grid(
            ChartView(self.metric_chart("accuracy", "accuracy (train batch)"), classes="chart"),
            ChartView(self.metric_chart("lr/0", "learning rate η (group 0)"), classes="chart"),
            ChartView(self.metric_chart("momentum/0", "momentum β (group 0)"), classes="chart"),
            ChartView(self.metric_chart("step_time", "step time (s)"), classes="chart"),
            id=self.name,
            classes="grid2",
        )
