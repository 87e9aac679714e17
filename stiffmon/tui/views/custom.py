"""Custom: the user's own scalars (``Agent.log(val_loss=…)`` publishes ``custom/val_loss``), one
chart per name for every visible run, stacked to share the height."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text
from textual.containers import Vertical
from textual.widget import Widget

from stiffmon.tui.views.base import ChartView, View

PREFIX = "custom/"
MIN_HEIGHT = 7


def custom_names(view: View) -> list[str]:
    """Every ``custom/…`` scalar name of any run, in order of appearance."""
    seen: dict[str, None] = {}
    for rd in view.app.store.runs.values():
        for n in rd.scalars:
            if n.startswith(PREFIX):
                seen[n] = None
    return list(seen)


class Custom(View):
    name = "custom"
    key = "0"
    title = "custom"

    def widget(self) -> Widget:
        return Vertical(ChartView(self.build, id="custom-charts"), id=self.name)

    def build(self, width: int, height: int) -> RenderableType:
        names = custom_names(self)
        if not names:
            return Text(
                "No custom scalars yet. In the training script:\n\n"
                "    agent.log(val_loss=0.31, val_acc=0.92)   # at the current step\n"
                "    agent.log(step=100, val_loss=0.31)\n\n"
                "Each name appears here as custom/<name>, and in the compare overlay (m).",
                style="dim",
            )
        fit = max(1, height // MIN_HEIGHT)
        shown = names[:fit]
        h = height // len(shown)
        charts: list[RenderableType] = [
            self.metric_chart(n, n[len(PREFIX) :])(width, h) for n in shown
        ]
        if len(shown) < len(names):
            charts[-1] = self.metric_chart(shown[-1], shown[-1][len(PREFIX) :])(width, h - 1)
            charts.append(
                Text(f"+{len(names) - len(shown)} more: make the terminal taller", style="dim")
            )
        return Group(*charts)
