"""Cockpit's three gradient tests of one run over time, with a legend that fits small panels.

The norm test θ_max, the inner-product test θ_max and the orthogonality test ν_max (below the
chosen θ or ν, drawn dashed: the batch is big enough). Three lines in one chart cannot be told
apart without a legend, so :class:`GradientTestsChart` always shows one: the full labels where
they fit (next to the title, or on a line of their own in a chart of 10 rows or more), else the
short ones (``norm``, ``inner``, ``ortho``, the words of the suggested-batch table) next to the
title or on a line of their own, which a chart of 6 rows or more gives up a plot row for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from rich.segment import Segment

from stiffmon.store import RunData
from stiffmon.tui.renderables import HLine, LineChart, asciify, fit_title
from stiffmon.tui.runlines import run_line, series_x, span_of

TESTS = (
    ("norm_test", "norm θ"),
    ("inner_product_test", "inner-product θ"),
    ("orthogonality_test", "orthogonality ν"),
)
SHORT = ("norm", "inner", "ortho")
"""The tests' labels where the full ones do not fit (as in the suggested-batch table)."""
COLORS = ("#3182bd", "#fdae6b", "#c6dbef")
LEGEND_ROWS = 10
"""Rows from which :class:`~stiffmon.tui.renderables.LineChart` puts a legend on its own line."""
MIN_ROWS = 6
"""Fewest rows of a chart that gives up a plot row for the short legend (2 plot rows are left)."""


@dataclass
class GradientTestsChart(LineChart):
    """A :class:`~stiffmon.tui.renderables.LineChart` whose legend is never left out for lack of
    room while the short labels fit.

    Attributes:
        short: Each line's short label, by its label (as drawn: ASCII in ``ascii``).
    """

    short: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ascii:
            self.short = {asciify(k): v for k, v in self.short.items()}

    def _header(self, width: int, rows: int) -> list[list[Segment]]:
        """The title with the full legend where it fits, else with the short one (on a line of
        its own where it does not fit beside the title)."""
        items = self._legend()
        size = sum(len(label) + 3 for label, _ in items)
        title = fit_title(self._title, width, self.ascii) if self.title else ""
        if not items or len(title) + size <= width or (rows >= LEGEND_ROWS and size <= width):
            return super()._header(width, rows)
        lines = self.lines
        self.lines = [replace(ln, label=self.short.get(ln.label, ln.label)) for ln in lines]
        try:
            return super()._header(width, LEGEND_ROWS if rows >= MIN_ROWS else rows)
        finally:
            self.lines = lines


def gradient_tests_chart(
    rd: RunData,
    *,
    x_time: bool,
    log_y: bool,
    ascii: bool,
    height: int,
    empty_text: str = "no gradient tests yet",
) -> LineChart:
    """θ_max / ν_max of one run's three gradient tests over time (below θ: batch big enough);
    ``empty_text`` without a line."""
    lines, hlines = [], []
    for (key, label), color in zip(TESTS, COLORS, strict=True):
        s = rd.series(f"noise/{key}")
        if s is None or not len(s):
            continue
        x = series_x(rd, s.steps, s.times, x_time)
        lines.append(run_line(rd, f"noise/{key}", x, s.values, color, label, x_time=x_time))
        theta = rd.last(f"noise/theta/{key}")
        if math.isfinite(theta):
            hlines.append(HLine(theta, color))
    return GradientTestsChart(
        lines,
        hlines,
        title=f"gradient tests, dashed: chosen θ — {rd.name}",
        x_span=span_of([rd], x_time),
        legend=True,
        log_y=log_y,
        ascii=ascii,
        height=height,
        x_label="seconds" if x_time else "step",
        empty_text=empty_text,
        short=dict(zip((label for _, label in TESTS), SHORT, strict=True)),
    )
