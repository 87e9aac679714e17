"""The plot area of :class:`~stiffmon.tui.renderables.linechart.LineChart` as a grid of cells:
braille dots (2 × 4 per character) for the series, joined column to column so gaps and spikes
stay visible, dashed threshold lines, markers and the cursor column on top.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from stiffmon.marks import ASCII_MARKS
from stiffmon.tui.renderables.axes import FloatArray, fmt_tick, thin_minmax
from stiffmon.tui.renderables.chart_items import tags

if TYPE_CHECKING:
    from stiffmon.tui.renderables.chart_items import StepLine
    from stiffmon.tui.renderables.linechart import LineChart

# Braille dot bits, indexed [row 0..3][col 0..1]
_BRAILLE = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
ASCII_SYMBOLS = {**ASCII_MARKS, "×": "x", "●": "@"}


def row_of(y: float, y0: float, y1: float, rows: int) -> int:
    """The plot row (0 at the top) of the value ``y`` on the axis ``[y0, y1]``."""
    f = (y - y0) / (y1 - y0)
    return min(rows - 1, max(0, round((1 - f) * (rows - 1))))


def free_span(
    text: list[list[str | None]],
    bits: npt.NDArray[np.int64],
    length: int,
    rows: int,
    near: int | None = None,
) -> tuple[int, int] | None:
    """Where ``length`` cells in a row carry nothing (no dot, no dash, no symbol), with an empty
    cell or the edge on both sides: (row, first column), the top ``rows`` rows searched from
    the top and each from the right (from the first column nearest ``near`` when given); None
    when there is no such place."""
    rows = min(rows, len(text))
    if rows <= 0 or length <= 0:
        return None
    free = np.array([[c is None for c in row] for row in text[:rows]]) & (bits[:rows] == 0)
    padded = np.pad(free, ((0, 0), (1, 1)), constant_values=True)  # the edges count as empty
    sums = np.concatenate([np.zeros((rows, 1), np.int64), np.cumsum(padded, axis=1)], axis=1)
    need = length + 2
    fits = sums[:, need:] - sums[:, :-need] == need  # [r, j]: cells j-1 … j+length all empty
    if near is not None:
        rr, cc = np.nonzero(fits)
        if not len(rr):
            return None
        best = int(np.lexsort((np.abs(cc - near), rr))[0])
        return int(rr[best]), int(cc[best])
    for r in range(rows):
        starts = np.flatnonzero(fits[r])
        if len(starts):
            return r, int(starts[-1])
    return None


def step_columns(sl: StepLine, x0: float, x1: float, pw: int) -> FloatArray:
    """The value of the step line held at each of ``pw`` plot columns (NaN: none, before its
    first x or past ``x_end``); a column that several measurements share shows the latest."""
    out = np.full(pw, np.nan)
    x = np.asarray(sl.x, dtype=np.float64)
    if not len(x) or sl.x_end < x0:
        return out
    cols = np.round((x - x0) / (x1 - x0) * (pw - 1))
    last = pw - 1 if sl.x_end >= x1 else round((sl.x_end - x0) / (x1 - x0) * (pw - 1))
    at = np.arange(pw)
    idx = np.searchsorted(cols, at, side="right") - 1
    ok = (idx >= 0) & (at <= last)
    out[ok] = np.asarray(sl.y, dtype=np.float64)[idx[ok]]
    return out


def draw_steps(
    text: list[list[str | None]],
    colors: list[list[str | None]],
    ly: FloatArray,
    y0: float,
    y1: float,
    color: str,
    ascii: bool = False,
) -> None:
    """Draw a step line held at ``ly[c]`` in each plot column ``c`` (NaN: none there) into the
    empty cells of ``text``: dashes ``╌`` at every other column of each level, and where the
    value moves to another row a riser ``╎`` with corners (``┐``/``└`` down, ``┘``/``┌`` up)
    in the column of the new value, so one line reads as one, not as loose segments. A riser to
    or from a value outside ``[y0, y1]`` runs to the plot's edge. ASCII: ``-``, ``|`` and
    ``+``."""
    ph = len(text)
    dash, riser, down_from, down_to, up_from, up_to = (
        ("-", "|", "+", "+", "+", "+") if ascii else ("╌", "╎", "┐", "└", "┘", "┌")
    )

    def put(r: int, c: int, ch: str) -> None:
        if 0 <= r < ph and text[r][c] is None:
            text[r][c], colors[r][c] = ch, color

    prev: int | None = None  # the last column's row: -1 above the range, ph below; None: no value
    stepped = False  # the last column was a step
    for c, v in enumerate(ly.tolist()):
        if not math.isfinite(v):
            prev = None
            continue
        r = -1 if v > y1 else ph if v < y0 else row_of(v, y0, y1, ph)
        if prev is not None and r != prev:  # a step: the riser and its corners
            down = r > prev
            for rr in range(min(prev, r) + 1, max(prev, r)):
                put(rr, c, riser)
            put(prev, c, down_from if down else up_from)
            put(r, c, down_to if down else up_to)
            put(prev, c - 1, dash)  # the dashes either side reach the corners
            stepped = True
        else:  # every other column; a line's first column and the one after a step always
            if c % 2 == 0 or prev is None or stepped:
                put(r, c, dash)
            stepped = False
        prev = r


def _tag_ends(
    chart: LineChart,
    text: list[list[str | None]],
    x0: float,
    x1: float,
    y0: float,
    y1: float,
) -> None:
    """Without colours: each tagged line's tag (:func:`~.linechart.tags`) on its last point in
    the window, so the curves are told apart (the legend says which tag is which)."""
    tag = tags(chart.lines)
    ph, pw = len(text), len(text[0]) if text else 0
    for ln in chart.lines:
        ok = np.isfinite(ln.x) & np.isfinite(ln.y) & (ln.x >= x0) & (ln.x <= x1)
        if chart.log_y:
            ok &= ln.y > 0
        if ln.label not in tag or not ok.any():
            continue
        i = int(np.flatnonzero(ok)[-1])
        yv = math.log10(float(ln.y[i])) if chart.log_y else float(ln.y[i])
        c = min(pw - 1, round((float(ln.x[i]) - x0) / (x1 - x0) * (pw - 1)))
        text[row_of(yv, y0, y1, ph)][c] = tag[ln.label]


def raster(
    chart: LineChart, x0: float, x1: float, y0: float, y1: float, pw: int, ph: int
) -> list[list[tuple[str, str | None]]]:
    """The plot area's cells (character, colour), top row first: threshold lines, the cursor,
    the series in braille (or ``*``), the markers, and the labels of thresholds above the range
    (on empty cells near the top, :func:`free_span`)."""
    sub_x, sub_y = (1, 1) if chart.ascii else (2, 4)
    gw, gh = pw * sub_x, ph * sub_y
    bits = np.zeros((ph, pw), dtype=np.int64)
    color_grid: list[list[str | None]] = [[None] * pw for _ in range(ph)]
    text: list[list[str | None]] = [[None] * pw for _ in range(ph)]

    def ypix(v: FloatArray) -> npt.NDArray[np.int64]:
        f = (v - y0) / (y1 - y0)
        return np.clip(np.round((1 - f) * (gh - 1)), 0, gh - 1).astype(np.int64)

    def to_y(v: float) -> float:
        if not chart.log_y:
            return v
        return math.log10(v) if v > 0 else math.nan

    dash = "-" if chart.ascii else "╌"
    above: list[tuple[str, float, str, int | None]] = []  # label, value, colour, last column
    for h in chart.hlines:
        hy = to_y(h.y)
        if h.label and math.isfinite(hy) and hy > y1 and h.x_end >= x0:
            above.append((h.label, h.y, h.color, None))
        if not math.isfinite(hy) or not (y0 <= hy <= y1) or h.x_end < x0:
            continue
        r = row_of(hy, y0, y1, ph)
        last = pw - 1 if h.x_end >= x1 else round((h.x_end - x0) / (x1 - x0) * (pw - 1))
        for c in range(0, last + 1, 2):
            if text[r][c] is None:
                text[r][c], color_grid[r][c] = dash, h.color
    for sl in chart.steplines:
        held = step_columns(sl, x0, x1, pw)
        ly = np.array([to_y(float(v)) for v in held])
        draw_steps(text, color_grid, ly, y0, y1, sl.color, chart.ascii)
        if sl.label:  # each part above the range: its lowest value, named over its end
            high = np.isfinite(ly) & (ly > y1)
            c = 0
            while c < pw:
                if not high[c]:
                    c += 1
                    continue
                e = c
                while e + 1 < pw and high[e + 1]:
                    e += 1
                above.append((sl.label, float(np.min(held[c : e + 1])), sl.color, e))
                c = e + 1
    if chart.cursor_x is not None and x0 <= chart.cursor_x <= x1:
        c = round((chart.cursor_x - x0) / (x1 - x0) * (pw - 1))
        for r in range(ph):
            text[r][c], color_grid[r][c] = (":" if chart.ascii else "┊"), "grey50"
    for ln in chart.lines:
        yv: FloatArray = ln.y.astype(np.float64)
        if chart.log_y:
            with np.errstate(divide="ignore", invalid="ignore"):
                yv = np.where(yv > 0, np.log10(np.where(yv > 0, yv, 1.0)), np.nan)
        cols, mins, maxs = thin_minmax(ln.x.astype(np.float64), yv, x0, x1, gw)
        if not cols.size:
            continue
        top, bot = ypix(maxs), ypix(mins)

        def plot(px: int, lo: int, hi: int, color: str = ln.color) -> None:
            cc, sx = divmod(px, sub_x)
            for py in range(min(lo, hi), max(lo, hi) + 1):
                rr, sy = divmod(py, sub_y)
                if chart.ascii:
                    text[rr][cc], color_grid[rr][cc] = "*", color
                else:
                    bits[rr, cc] |= _BRAILLE[sy][sx]
                    color_grid[rr][cc] = color
                    text[rr][cc] = None

        prev: tuple[int, int] | None = None
        for cx, t, b in zip(
            cols.astype(np.int64).tolist(), top.tolist(), bot.tolist(), strict=True
        ):
            mid = (t + b) // 2
            if prev is not None:  # join to the previous point, whatever the gap
                px, py = prev
                gap = cx - px
                last = py
                for k in range(1, gap):
                    yk = round(py + (mid - py) * k / gap)
                    plot(px + k, last, yk)
                    last = yk
                plot(cx, last, mid)
            plot(cx, t, b)
            prev = (cx, mid)
    for m in chart.markers:
        my = to_y(m.y)
        if not (math.isfinite(m.x) and math.isfinite(my)) or not (
            x0 <= m.x <= x1 and y0 <= my <= y1
        ):
            continue
        c = min(pw - 1, round((m.x - x0) / (x1 - x0) * (pw - 1)))
        r = row_of(my, y0, y1, ph)
        sym = ASCII_SYMBOLS.get(m.symbol, "#") if chart.ascii else m.symbol
        text[r][c], color_grid[r][c] = sym, m.color
    if chart.no_color:
        _tag_ends(chart, text, x0, x1, y0, y1)
    # thresholds above the y range: named near the top right, ``↑thr 190``, on empty cells only
    arrow = "^" if chart.ascii else "↑"
    for label, value, color, end in above:
        named = f"{arrow}{label + ' ' if label else ''}{fmt_tick(value)}"
        for lab in dict.fromkeys((named, f"{arrow}{fmt_tick(value)}")):
            near = None if end is None else max(0, end - len(lab) + 1)
            spot = free_span(text, bits, len(lab), max(1, ph // 3), near)
            if spot is not None:
                r, start = spot
                for i, ch in enumerate(lab):
                    text[r][start + i], color_grid[r][start + i] = ch, color
                break
    out: list[list[tuple[str, str | None]]] = []
    for r in range(ph):
        row = []
        for c in range(pw):
            if text[r][c] is not None:
                row.append((text[r][c] or " ", color_grid[r][c]))
            elif bits[r, c]:
                row.append((chr(0x2800 + int(bits[r, c])), color_grid[r][c]))
            else:
                row.append((" ", None))
        out.append(row)
    return out
