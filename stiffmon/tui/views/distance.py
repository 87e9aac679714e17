"""Distance: stiffness against distance (one curve per space) with ξ marked, and ξ per space over
training, for the selected run."""

from __future__ import annotations

import numpy as np
from rich.console import RenderableType
from textual.containers import Vertical
from textual.widget import Widget

from stiffmon.tui.renderables import HLine, Line, LineChart, Marker
from stiffmon.tui.views.base import ChartView, View
from stiffmon.tui.views.stiffness import scrubbed

SPACE_COLORS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#72b7b2", "#eeca3b")


def space_color(j: int) -> str:
    return SPACE_COLORS[j % len(SPACE_COLORS)]


class Distance(View):
    name = "distance"
    key = "3"
    title = "distance"

    def widget(self) -> Widget:
        return Vertical(
            ChartView(self.curve, classes="chart"),
            ChartView(self.xi_chart, classes="chart"),
            id=self.name,
        )

    def curve(self, width: int, height: int) -> RenderableType:
        rd = self.selected_run()
        lines, markers = [], []
        step = None
        if rd is not None:
            curves = sorted(
                (k, v) for k, v in rd.curves.items() if k.startswith("stiffness-distance/")
            )
            for j, (name, snaps) in enumerate(curves):
                snap, _ = scrubbed(snaps, self.app.scrub)
                if snap is None:
                    continue
                c = space_color(j)
                space = name.split("/", 1)[-1]
                x, y = snap.msg.x.astype(np.float64), snap.msg.y.astype(np.float64)
                lines.append(Line(x, y, c, space))
                xi = snap.msg.attrs.get("xi")
                if isinstance(xi, int | float):
                    markers.append(Marker(float(xi), 0.0, c))
                step = snap.step
        title = (
            f"{rd.name}: stiffness vs distance at step {step:,}; ◆ critical length ξ (y = 0)"
            if rd is not None and step is not None
            else "stiffness vs distance"
        )
        return LineChart(
            lines,
            [HLine(0.0, "grey50")],
            markers,
            title=title,
            ascii=self.app.ascii,
            height=height,
            x_label="distance (unit-normalised)",
            empty_text="no stiffness-vs-distance curve yet",
            legend=True,
        )

    def xi_chart(self, width: int, height: int) -> RenderableType:
        rd = self.selected_run()
        lines = []
        if rd is not None:
            names = sorted(n for n in rd.scalars if n.startswith("xi/"))
            for j, name in enumerate(names):
                xy = self.xy(rd, name)
                if xy is not None:
                    lines.append(self.run_line(rd, name, xy, space_color(j), name.split("/", 1)[1]))
        title = f"{rd.name}: critical length ξ per space over training" if rd else "ξ"
        return self.chart(lines, title, height, legend=True, empty_text="no ξ yet")
