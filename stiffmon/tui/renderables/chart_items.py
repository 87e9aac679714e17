"""What a :class:`~stiffmon.tui.renderables.linechart.LineChart` draws: lines (series), dashed
horizontal and step lines (thresholds), markers, marks on the x axis, and the tags that tell
lines apart where colours cannot be shown.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stiffmon.tui.renderables.axes import FloatArray


@dataclass(frozen=True)
class Line:
    """One series: x (step or time) and y, drawn in ``color``.

    ``end`` and ``stale`` say when a value stops being current, for the cursor read-out: past
    ``end`` (the run's last step) the line has no value, and a value measured before an x in
    ``stale`` (sorted; e.g. the run diverged, or the measurement was skipped as not finite) is
    not shown at a cursor at or after that x. ``tag`` tells it apart where colours cannot be
    shown (:func:`tags`).
    """

    x: FloatArray
    y: FloatArray
    color: str
    label: str = ""
    end: float = math.inf
    stale: tuple[float, ...] = ()
    tag: str = ""  # its run's tag (:func:`tags`), the same in the run list

    def value_at(self, cx: float) -> float:
        """The current value at ``cx``: the latest at or before it, NaN when there is none or
        it is no longer current (past ``end``, or a ``stale`` x lies after it)."""
        if cx > self.end:
            return math.nan
        i = int(np.searchsorted(self.x, cx, side="right")) - 1
        if not 0 <= i < len(self.y):
            return math.nan
        j = bisect.bisect_right(self.stale, cx)
        if j and self.stale[j - 1] > float(self.x[i]):
            return math.nan
        return float(self.y[i])


@dataclass(frozen=True)
class HLine:
    """A dashed horizontal line (e.g. a run's stability threshold 2/η), drawn up to ``x_end``
    (its run's last step). A labelled one above the y range is named near the top right, on
    cells no curve, dash or marker covers: ``↑thr 190`` (``↑190`` where only that fits)."""

    y: float
    color: str
    label: str = ""
    x_end: float = math.inf


@dataclass(frozen=True)
class StepLine:
    """A dashed step line (e.g. a run's stability threshold under an lr schedule): ``y[i]``
    measured at ``x[i]`` (sorted) is held until ``x[i + 1]``, the last one up to ``x_end`` (its
    run's last step). A constant one looks like an :class:`HLine` from ``x[0]``. Parts above the
    y range are named near the top over their end: ``↑thr 190`` (the lowest value of that part;
    ``↑190`` where only that fits)."""

    x: FloatArray
    y: FloatArray
    color: str
    label: str = ""
    x_end: float = math.inf

    def value_at(self, cx: float) -> float:
        """The value held at ``cx``: the last measured at or before it; NaN before the first
        and past ``x_end``."""
        i = int(np.searchsorted(self.x, cx, side="right")) - 1
        return float(self.y[i]) if i >= 0 and cx <= self.x_end else math.nan

    def visible(self, lo: float, hi: float) -> FloatArray:
        """The values held somewhere in [lo, hi]."""
        i0 = max(0, int(np.searchsorted(self.x, lo, side="right")) - 1)
        i1 = int(np.searchsorted(self.x, hi, side="right"))
        return self.y[i0:i1] if lo <= self.x_end else self.y[:0]


@dataclass(frozen=True)
class Marker:
    """A symbol at (x, y), e.g. ◆ at a run's break-even point (ASCII: see ``ASCII_SYMBOLS``)."""

    x: float
    y: float
    color: str
    symbol: str = "◆"


@dataclass(frozen=True)
class XMark:
    """A symbol on the x axis at ``x`` (e.g. × where a measurement was skipped)."""

    x: float
    color: str
    symbol: str = "×"


TAGS = "123456789abcdefghijklmnopqrstuvwxyz"
"""What tells lines apart without colours (:func:`tags`)."""


def tags(lines: Sequence[Line]) -> dict[str, str]:
    """Each line label's tag: the lines' own (a run's, as the run list shows it) where they
    have them, else by order of the lines (the first 35 labels; none for one label alone).
    Without colours (``no_color``) the legend, read-out and curve ends use it."""
    own = {ln.label: ln.tag for ln in reversed(lines) if ln.label and ln.tag}
    if own:
        return own
    labels = list(dict.fromkeys(ln.label for ln in lines if ln.label))
    return dict(zip(labels, TAGS, strict=False)) if len(labels) > 1 else {}
