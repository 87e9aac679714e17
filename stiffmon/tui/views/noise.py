"""Noise: Tr K, λ1_K, conditioning and the simple noise scale of every run; Cockpit's gradient
tests (θ_max, ν_max) of the selected run and the batch size they suggest next to the actual one.

A quantity that is NaN at every measurement of a run will never come: the chart says so, and
why where the run's other noise scalars tell (Tr K = 0: the per-example gradients are zero;
‖G‖² ≤ 0: the mean gradient is within its noise), instead of "no … yet".
"""

from __future__ import annotations

import numpy as np
from rich.console import Group, RenderableType
from rich.text import Text
from textual.containers import Grid
from textual.widget import Widget

from stiffmon.run_data import RunData
from stiffmon.tui.curvature import batch_chart, batch_table, gradient_tests_chart
from stiffmon.tui.views.base import Builder, ChartView, View, run_color

TEST_KEYS = ("norm_test", "inner_product_test", "orthogonality_test")


class Noise(View):
    name = "noise"
    key = "5"
    title = "noise"

    def widget(self) -> Widget:
        return Grid(
            ChartView(self.noise_chart("noise/trace_k", "Tr K"), classes="chart"),
            ChartView(self.noise_chart("noise/lambda1_k", "λ1_K"), classes="chart"),
            ChartView(
                self.noise_chart("noise/conditioning", "conditioning λk/λ1"), classes="chart"
            ),
            ChartView(self.noise_chart("noise/b_simple", "noise scale B_simple"), classes="chart"),
            ChartView(self.tests, classes="chart"),
            ChartView(self.batch, classes="chart"),
            id=self.name,
            classes="grid23",
        )

    def noise_chart(self, name: str, title: str) -> Builder:
        """:meth:`metric_chart` of ``name``, or, when no visible run has a finite value and some
        have only NaN, why those never will."""
        chart = self.metric_chart(name, title)

        def build(width: int, height: int) -> RenderableType:
            runs = self.runs()
            if any(_finite(rd, name) for rd in runs):
                return chart(width, height)
            said = nevers(runs, name, title)
            return Text(said, style="dim") if said else chart(width, height)

        return build

    def tests(self, width: int, height: int) -> RenderableType:
        rd = self.selected_run()
        if rd is None:
            return Text("no runs yet", style="dim")
        why = never(rd, tuple(f"noise/{k}" for k in TEST_KEYS), "gradient tests")
        if why:  # it will never come: say why, not "yet"
            return Text(f"{rd.name}: {why}", style="dim")
        app = self.app
        return gradient_tests_chart(
            rd, x_time=app.x_time, log_y=app.log_y, ascii=app.ascii, height=height
        )

    def batch(self, width: int, height: int) -> RenderableType:
        runs = [(rd, run_color(rd)) for rd in self.runs()]
        table = batch_table(runs, ascii=self.app.ascii)
        rows = len(table.renderables) if isinstance(table, Group) else 1
        name = "noise/suggested_batch/norm_test"
        if not any(_finite(rd, name) for rd, _ in runs):
            said = nevers([rd for rd, _ in runs], name, "suggested batch")
            if said:  # it will never come: say why, not "yet"
                return Group(Text(said, style="dim"), table)
        chart = batch_chart(
            runs,
            "norm_test",
            x_time=self.app.x_time,
            ascii=self.app.ascii,
            height=max(5, height - rows),
        )
        return Group(chart, table)


def _finite(rd: RunData, name: str) -> bool:
    """Whether ``rd`` has a finite value of scalar ``name``."""
    s = rd.series(name)
    return s is not None and bool(np.isfinite(s.values).any())


def nevers(runs: list[RunData], name: str, title: str) -> str:
    """``run: why`` lines of the runs whose ``name`` never comes (:func:`never`), or ``""``."""
    return "\n".join(f"{rd.name}: {why}" for rd in runs if (why := never(rd, (name,), title)))


def never(rd: RunData, names: tuple[str, ...], title: str) -> str | None:
    """Why ``rd`` shows none of ``names``: each was measured and NaN every time (with the cause
    where the run's other noise scalars tell); None while one may still come.

    Args:
        rd: The run.
        names: The scalars (any one of them would be drawn).
        title: What they are called (``noise scale B_simple``, ``gradient tests``).

    Returns:
        ``no <title>: NaN at all <n> measurements (<cause>)``, or None.
    """
    series = [rd.series(n) for n in names]
    if any(s is None or not len(s) or np.isfinite(s.values).any() for s in series):
        return None
    n = max(len(s) for s in series if s is not None)
    cause = _cause(rd, names)
    return f"no {title}: NaN at all {n:,} measurements" + (f" ({cause})" if cause else "")


def _cause(rd: RunData, names: tuple[str, ...]) -> str | None:
    """What the Gram's other noise scalars say about ``names`` being NaN, if anything."""
    trace = rd.series("noise/trace_k")
    if trace is not None and len(trace) and bool((trace.values == 0).all()):
        return "Tr K = 0 at every measurement: the per-example gradients are zero"
    grad_sq = rd.series("noise/grad_sq")
    if (
        "noise/b_simple" in names
        and grad_sq is not None
        and len(grad_sq)
        and bool((grad_sq.values <= 0).all())
    ):
        return "‖G‖² ≤ 0 at every measurement: the mean gradient is within its noise"
    return None
