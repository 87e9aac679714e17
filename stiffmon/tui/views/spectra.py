"""Spectra: the top Hessian eigenvalues and the gradient-covariance spectrum of the selected run
over training, one curve per eigenvalue index."""

from __future__ import annotations

import numpy as np
from rich.console import RenderableType
from textual.containers import Vertical
from textual.widget import Widget

from stiffmon import protocol as p
from stiffmon.store import Snapshot
from stiffmon.tui.renderables import Line
from stiffmon.tui.views.base import Builder, ChartView, View
from stiffmon.tui.views.distance import space_color

MAX_CURVES = 6


def _values(snap: Snapshot) -> np.ndarray:
    msg = snap.msg
    return msg.values if isinstance(msg, p.Spectrum) else np.zeros(0)


class Spectra(View):
    name = "spectra"
    key = "9"
    title = "spectra"

    def widget(self) -> Widget:
        return Vertical(
            ChartView(
                self.spectrum("hessian", "Hessian eigenvalues λ1…λk", False), classes="chart"
            ),
            ChartView(
                self.spectrum("grad-cov", "gradient covariance eigenvalues (log-y)", True),
                classes="chart",
            ),
            id=self.name,
        )

    def spectrum(self, name: str, title: str, log_y: bool) -> Builder:
        def build(width: int, height: int) -> RenderableType:
            rd = self.selected_run()
            snaps = rd.spectra.get(name, []) if rd is not None else []
            lines = []
            if rd is not None and snaps:
                k = min(MAX_CURVES, max(len(_values(s)) for s in snaps))
                steps = np.array([s.step for s in snaps], dtype=np.float64)
                times = np.array([s.t - rd.first_t for s in snaps], dtype=np.float64)
                x = times if self.app.x_time else steps
                for i in range(k):
                    y = np.array(
                        [float(_values(s)[i]) if len(_values(s)) > i else np.nan for s in snaps]
                    )
                    lines.append(Line(x, y, space_color(i), f"λ{i + 1}"))
                n = max(len(_values(s)) for s in snaps)
                more = f" (top {k} of {n})" if n > k else ""
                head = f"{rd.name}: {title}{more}"
            else:
                head = f"{rd.name}: {title}" if rd is not None else title
            return self.chart(
                lines,
                head,
                height,
                log_y=log_y or self.app.log_y,
                legend=True,
                empty_text=f"no {name} spectrum yet",
            )

        return build
