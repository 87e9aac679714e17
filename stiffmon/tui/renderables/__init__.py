"""Pure Rich renderables of the monitor, one module per drawing."""

from __future__ import annotations

from stiffmon.tui.renderables.axes import asciify, fmt_tick, fmt_value, nice_ticks, thin_minmax
from stiffmon.tui.renderables.heatmap import Heatmap, ascii_level, diverging, short_labels
from stiffmon.tui.renderables.linechart import HLine, Line, LineChart, Marker, XMark
from stiffmon.tui.renderables.stepheatmap import StepHeatmap

__all__ = [
    "HLine",
    "Heatmap",
    "Line",
    "LineChart",
    "Marker",
    "StepHeatmap",
    "XMark",
    "ascii_level",
    "asciify",
    "diverging",
    "fmt_tick",
    "fmt_value",
    "nice_ticks",
    "short_labels",
    "thin_minmax",
]
