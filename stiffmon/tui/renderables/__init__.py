"""Pure Rich renderables of the monitor, one module per drawing."""

from __future__ import annotations

from stiffmon.tui.renderables.axes import (
    asciify,
    fit_title,
    fmt_tick,
    fmt_value,
    log_labels,
    log_ticks,
    nice_ticks,
    thin_minmax,
    tick_labels,
)
from stiffmon.tui.renderables.chart_items import HLine, Line, Marker, StepLine, XMark
from stiffmon.tui.renderables.heatmap import (
    Heatmap,
    ascii_level,
    diverging,
    glyph_scale,
    short_labels,
)
from stiffmon.tui.renderables.linechart import LineChart
from stiffmon.tui.renderables.stepheatmap import StepHeatmap

__all__ = [
    "HLine",
    "Heatmap",
    "Line",
    "LineChart",
    "Marker",
    "StepHeatmap",
    "StepLine",
    "XMark",
    "ascii_level",
    "asciify",
    "diverging",
    "fit_title",
    "fmt_tick",
    "fmt_value",
    "glyph_scale",
    "log_labels",
    "log_ticks",
    "nice_ticks",
    "short_labels",
    "thin_minmax",
    "tick_labels",
]
