"""Layers: the selected run's per-layer mean cosine stiffness as a layer × step heatmap."""

from __future__ import annotations

import numpy as np
from rich.console import RenderableType
from textual.containers import Vertical
from textual.widget import Widget

from stiffmon.tui.renderables import StepHeatmap
from stiffmon.tui.views.base import ChartView, View

PREFIX = "layer-stiffness/"


class Layers(View):
    name = "layers"
    key = "8"
    title = "layers"
    zoomable = False

    def widget(self) -> Widget:
        return Vertical(ChartView(self.build, id="layers-map"), id=self.name)

    def build(self, width: int, height: int) -> RenderableType:
        rd = self.selected_run()
        names = [n for n in rd.scalars if n.startswith(PREFIX)] if rd is not None else []
        if rd is None or not names:
            title = f"{rd.name}: " if rd is not None else ""
            return StepHeatmap(np.zeros((0, 0)), [], [], title=f"{title}per-layer stiffness")
        steps = np.unique(np.concatenate([rd.scalars[n].steps for n in names]))
        m = np.full((len(names), len(steps)), np.nan)
        for r, n in enumerate(names):
            s = rd.scalars[n]
            m[r, np.searchsorted(steps, s.steps)] = s.values
        return StepHeatmap(
            m,
            [n[len(PREFIX) :] for n in names],
            steps.tolist(),
            title=f"{rd.name}: stiffness per layer (mean cosine, train pairs)",
            ascii=self.app.ascii,
            color=not self.app.no_color,
            height=height,
        )
