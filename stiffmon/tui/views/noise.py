"""Noise: Tr K, λ1_K, conditioning and the simple noise scale of every run."""

from __future__ import annotations

from textual.containers import Grid
from textual.widget import Widget

from stiffmon.tui.views.base import ChartView, View


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
            id=self.name,
            classes="grid2",
        )
