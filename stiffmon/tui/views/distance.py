"""Distance: stiffness against distance (one curve per space) with ξ marked, and ξ per space over
training, for the selected run."""

from __future__ import annotations

import numpy as np
from rich.console import RenderableType
from rich.text import Text
from textual.containers import Vertical
from textual.widget import Widget

from stiffmon.store import RunData
from stiffmon.tui.renderables import HLine, Line, LineChart, Marker
from stiffmon.tui.views.base import ChartView, View
from stiffmon.tui.views.stiffness import scrubbed

SPACE_COLORS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#72b7b2", "#eeca3b")


NO_CURVE = (
    "no stiffness-vs-distance curve is made for this run (the agent makes one in input space "
    "only when the probe inputs are one float tensor; distance_layers=[...] gives curves in a "
    "layer's activation space)"
)


def space_color(j: int) -> str:
    return SPACE_COLORS[j % len(SPACE_COLORS)]


def space_label(space: str) -> str:
    """A space's legend entry: ``input``, or ``layer 1`` for the activations of the module the
    agent names ``1`` (``distance_layers``: an ``nn.Sequential`` index reads as a bare number),
    ``layer encoder.layer.0``."""
    return space if space == "input" else f"layer {space}"


def curve_names(rd: RunData) -> list[str]:
    return sorted(k for k in rd.curves if k.startswith("stiffness-distance/"))


def no_curve(rd: RunData) -> str | None:
    """Why the run will get no stiffness-vs-distance curve, or None while one may still come.

    The agent's ``no-distance-curve`` event says why; without one, a Gram measurement that came
    without a curve says so (a measurement's curves precede its ``stiffness/…`` and
    ``layer-stiffness/…`` scalars, so those mark a complete one; two matrices of a kind do too).
    """
    if curve_names(rd):
        return None
    why = next((e.message for e in rd.events if e.code == "no-distance-curve"), "")
    if why:
        return why
    measured = any(n.startswith(("stiffness/", "layer-stiffness/")) for n in rd.scalars)
    if measured or any(len(v) > 1 for v in rd.matrices.values()):
        return NO_CURVE
    return None


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
        why = no_curve(rd) if rd is not None else None
        if rd is not None and why is not None:  # it will never come: say why, not "yet"
            return Text(f"{rd.name}: {why}", style="dim")
        if rd is not None:
            for j, name in enumerate(curve_names(rd)):
                snap, _ = scrubbed(rd.curves[name], self.app.scrub)
                if snap is None:
                    continue
                c = space_color(j)
                space = name.split("/", 1)[-1]
                x, y = snap.msg.x.astype(np.float64), snap.msg.y.astype(np.float64)
                lines.append(Line(x, y, c, space_label(space)))
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
            no_color=self.app.no_color,
        )

    def xi_chart(self, width: int, height: int) -> RenderableType:
        rd = self.selected_run()
        lines = []
        if rd is not None:
            names = sorted(n for n in rd.scalars if n.startswith("xi/"))
            for j, name in enumerate(names):
                xy = self.xy(rd, name)
                if xy is not None:
                    label = space_label(name.split("/", 1)[1])
                    lines.append(self.run_line(rd, name, xy, space_color(j), label))
        title = f"{rd.name}: critical length ξ per space over training" if rd else "ξ"
        none = rd is not None and no_curve(rd) is not None
        empty = "no ξ for this run (no curve is made)" if none else "no ξ yet"
        return self.chart(lines, title, height, legend=True, empty_text=empty)
