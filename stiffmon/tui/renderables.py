"""Pure Rich renderables for the monitor: a multi-series line chart and a stiffness heatmap.

Hand-written rather than plotext / textual-plot: the chart must thin 100k-point series to the
column width with per-column min/max (so spikes survive), draw dashed per-run threshold lines and
◆ break-even markers, switch to log-y, and fall back to plain ASCII — all inside one Rich
renderable that unit tests can render to an exact string.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.style import Style

FloatArray = npt.NDArray[np.float64]

# Braille dot bits, indexed [row 0..3][col 0..1]
_BRAILLE = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))


@dataclass(frozen=True)
class Line:
    """One series: x (step or time) and y, drawn in ``color``."""

    x: FloatArray
    y: FloatArray
    color: str
    label: str = ""


@dataclass(frozen=True)
class HLine:
    """A dashed horizontal line (e.g. a run's stability threshold 2/η)."""

    y: float
    color: str
    label: str = ""


@dataclass(frozen=True)
class Marker:
    """A symbol at (x, y), e.g. ◆ at a run's break-even point."""

    x: float
    y: float
    color: str
    symbol: str = "◆"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 × 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    k0, k1 = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [float(f"{k * step:.12g}") for k in range(k0, k1 + 1)]


def fmt_tick(v: float) -> str:
    """Short tick label: 0.05, 1.2k, 3e-05 ..."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    if a >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:.3g}"


def thin_minmax(
    x: FloatArray, y: FloatArray, x0: float, x1: float, columns: int
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Per pixel column: (column index, min y, max y) of the finite points inside [x0, x1]."""
    ok = np.isfinite(x) & np.isfinite(y) & (x >= x0) & (x <= x1)
    if not ok.any():
        e = np.zeros(0)
        return e, e, e
    xs, ys = x[ok], y[ok]
    span = x1 - x0 if x1 > x0 else 1.0
    col = np.minimum(((xs - x0) / span * (columns - 1) + 0.5).astype(np.int64), columns - 1)
    if col.size > 1 and bool((col[1:] < col[:-1]).any()):  # series are usually sorted already
        order = np.argsort(col, kind="stable")
        col, ys = col[order], ys[order]
    start = np.concatenate(([0], np.flatnonzero(col[1:] != col[:-1]) + 1))
    uniq = col[start]
    mins = np.minimum.reduceat(ys, start)
    maxs = np.maximum.reduceat(ys, start)
    return uniq.astype(np.float64), mins, maxs


_STYLES: dict[str, Style] = {}


def _row_segments(row: list[tuple[str, str | None]]) -> list[Segment]:
    """One Segment per run of cells with the same colour (far fewer objects than cells)."""
    out: list[Segment] = []
    buf: list[str] = []
    current: str | None = None
    for ch, color in row:
        if color != current and buf:
            out.append(Segment("".join(buf), _style(current)))
            buf = []
        current = color
        buf.append(ch)
    if buf:
        out.append(Segment("".join(buf), _style(current)))
    return out


def _style(color: str | None) -> Style | None:
    if color is None:
        return None
    style = _STYLES.get(color)
    if style is None:
        style = _STYLES[color] = Style(color=color)
    return style


@dataclass
class LineChart:
    """Multi-series line chart at braille resolution (2×4 dots per character).

    Args:
        lines: Series to draw, later ones on top.
        hlines: Dashed horizontal lines.
        markers: Symbols drawn last.
        title: Title line (empty: none).
        log_y: Logarithmic y axis (non-positive values are dropped).
        ascii: Plain ASCII: ``*`` points, ``-`` dashes, ``#`` markers, ``|`` / ``-`` axes.
        height: Rows including axes (default: what the console offers, else 12).
        x_label: Caption under the x axis.
        y_range: Fixed (lo, hi) for the y axis.
        empty_text: Shown when there is nothing to draw.
    """

    lines: Sequence[Line]
    hlines: Sequence[HLine] = ()
    markers: Sequence[Marker] = ()
    title: str = ""
    log_y: bool = False
    ascii: bool = False
    height: int | None = None
    x_label: str = "step"
    y_range: tuple[float, float] | None = None
    empty_text: str = "no data yet"
    _ticks: list[float] = field(default_factory=list, repr=False)

    def _bounds(self) -> tuple[float, float, float, float] | None:
        xs, ys = [], []
        for ln in self.lines:
            ok = np.isfinite(ln.x) & np.isfinite(ln.y)
            if self.log_y:
                ok &= ln.y > 0
            if ok.any():
                xs += [float(ln.x[ok].min()), float(ln.x[ok].max())]
                ys += [float(ln.y[ok].min()), float(ln.y[ok].max())]
        if not xs:
            return None
        data_top = max(ys)
        for h in self.hlines:  # thresholds far above the data would flatten it: leave them off
            if (
                math.isfinite(h.y)
                and (h.y > 0 or not self.log_y)
                and h.y <= 2 * abs(data_top) + 1e-12
            ):
                ys.append(h.y)
        for m in self.markers:
            if math.isfinite(m.y) and (m.y > 0 or not self.log_y):
                ys.append(m.y)
        x0, x1 = min(xs), max(xs)
        y0, y1 = (min(ys), max(ys)) if self.y_range is None else self.y_range
        if self.log_y:
            y0, y1 = math.log10(y0), math.log10(y1)
        if y1 - y0 < 1e-12 * max(1.0, abs(y1)):
            pad = abs(y0) * 0.1 or 1.0
            y0, y1 = y0 - pad, y1 + pad
        if x1 <= x0:
            x1 = x0 + 1.0
        return x0, x1, y0, y1

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(8, options.max_width)
        height = self.height or options.height or 12
        yield from self.render_lines(width, max(5, height))

    def render_lines(self, width: int, height: int) -> list[Segment]:
        """Segments of the chart, ``height`` rows of ``width`` cells (newlines included)."""
        segs: list[Segment] = []
        rows = height
        if self.title:
            segs += [Segment(self.title[:width].ljust(width), Style(bold=True)), Segment.line()]
            rows -= 1
        bounds = self._bounds()
        if bounds is None:
            for i in range(rows):
                text = self.empty_text if i == rows // 2 else ""
                segs += [Segment(text.center(width)[:width], Style(dim=True)), Segment.line()]
            return segs
        x0, x1, y0, y1 = bounds
        plot_rows = rows - 2  # x axis line and x tick labels
        yt = self._y_ticks(y0, y1, max(2, plot_rows // 3))
        labels = [fmt_tick(10**t if self.log_y else t) for t in yt]
        lw = max((len(s) for s in labels), default=1) + 1
        pw = max(4, width - lw - 1)
        cells = self._raster(x0, x1, y0, y1, pw, plot_rows)
        tick_rows = {
            self._row_of(t, y0, y1, plot_rows): lab for t, lab in zip(yt, labels, strict=True)
        }
        axis = Style(dim=True)
        vbar, hbar, corner = ("|", "-", "+") if self.ascii else ("│", "─", "└")
        for r in range(plot_rows):
            lab = tick_rows.get(r, "")
            segs.append(Segment(lab.rjust(lw - 1) + " ", axis))
            segs.append(Segment("┤" if lab and not self.ascii else vbar, axis))
            segs += _row_segments(cells[r])
            segs.append(Segment.line())
        segs.append(Segment(" " * lw + corner + hbar * pw, axis))
        segs.append(Segment.line())
        segs.append(Segment(self._x_axis(x0, x1, lw, pw, width), axis))
        segs.append(Segment.line())
        return segs

    def _y_ticks(self, y0: float, y1: float, n: int) -> list[float]:
        if self.log_y:
            lo, hi = math.floor(y0), math.ceil(y1)
            ticks = [float(d) for d in range(lo, hi + 1) if y0 - 1e-9 <= d <= y1 + 1e-9]
            return ticks or [y0, y1]
        return nice_ticks(y0, y1, n)

    @staticmethod
    def _row_of(y: float, y0: float, y1: float, rows: int) -> int:
        f = (y - y0) / (y1 - y0)
        return min(rows - 1, max(0, round((1 - f) * (rows - 1))))

    def _x_axis(self, x0: float, x1: float, lw: int, pw: int, width: int) -> str:
        buf = [" "] * width
        for t in nice_ticks(x0, x1, max(2, pw // 12)):
            col = lw + 1 + round((t - x0) / (x1 - x0) * (pw - 1))
            lab = fmt_tick(t)
            start = min(max(lw + 1, col - len(lab) // 2), width - len(lab))
            if all(c == " " for c in buf[max(0, start - 1) : start + len(lab) + 1]):
                buf[start : start + len(lab)] = list(lab)
        text = "".join(buf).rstrip()
        cap = f" {self.x_label}"
        if len(text) + len(cap) <= width:
            text = text.ljust(width - len(cap)) + cap
        return text[:width].ljust(width)

    def _raster(
        self, x0: float, x1: float, y0: float, y1: float, pw: int, ph: int
    ) -> list[list[tuple[str, str | None]]]:
        sub_x, sub_y = (1, 1) if self.ascii else (2, 4)
        gw, gh = pw * sub_x, ph * sub_y
        bits = np.zeros((ph, pw), dtype=np.int64)
        color_grid: list[list[str | None]] = [[None] * pw for _ in range(ph)]
        text: list[list[str | None]] = [[None] * pw for _ in range(ph)]

        def ypix(v: FloatArray) -> npt.NDArray[np.int64]:
            f = (v - y0) / (y1 - y0)
            return np.clip(np.round((1 - f) * (gh - 1)), 0, gh - 1).astype(np.int64)

        for h in self.hlines:
            hy = (
                math.log10(h.y) if self.log_y and h.y > 0 else (h.y if not self.log_y else math.nan)
            )
            if not math.isfinite(hy) or not (y0 <= hy <= y1):
                continue
            r = self._row_of(hy, y0, y1, ph)
            for c in range(0, pw, 2):
                if text[r][c] is None:
                    text[r][c], color_grid[r][c] = ("-" if self.ascii else "╌"), h.color
        for ln in self.lines:
            yv: FloatArray = ln.y.astype(np.float64)
            if self.log_y:
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
                    if self.ascii:
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
        for m in self.markers:
            my = (
                math.log10(m.y) if self.log_y and m.y > 0 else (m.y if not self.log_y else math.nan)
            )
            if not (math.isfinite(m.x) and math.isfinite(my)) or not (
                x0 <= m.x <= x1 and y0 <= my <= y1
            ):
                continue
            c = min(pw - 1, round((m.x - x0) / (x1 - x0) * (pw - 1)))
            r = self._row_of(my, y0, y1, ph)
            text[r][c], color_grid[r][c] = ("#" if self.ascii else m.symbol), m.color
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


# ----------------------------------------------------------------------------- heatmap

_NEG = (59, 76, 192)  # coolwarm: blue at -1
_MID = (221, 221, 221)  # light grey at 0
_POS = (180, 4, 38)  # red at +1


def diverging(v: float, vmax: float = 1.0) -> str:
    """Colour of ``v`` on a blue–grey–red map centred at 0 over [-vmax, vmax]; NaN is dark."""
    if not math.isfinite(v):
        return "#303030"
    f = max(-1.0, min(1.0, v / vmax))
    a, b = (_MID, _POS) if f >= 0 else (_MID, _NEG)
    t = abs(f)
    r, g, bl = (round(a[i] + (b[i] - a[i]) * t) for i in range(3))
    return f"#{r:02x}{g:02x}{bl:02x}"


_ASCII_LEVELS = "=-.+#"  # -1 … +1


def ascii_level(v: float) -> str:
    if not math.isfinite(v):
        return "?"
    f = max(-1.0, min(1.0, v))
    return _ASCII_LEVELS[min(4, int((f + 1) / 2 * 5))]


@dataclass
class Heatmap:
    """Class stiffness heatmap: diverging colours centred at 0, labels, colour bar, cursor.

    Each class pair is a cell ``cell_width`` characters wide; two matrix rows share one line
    through the half block ▀ (top row in the foreground colour, bottom row in the background),
    so a 10×10 matrix takes 5 lines. Row labels name both rows of a line (``0·1``). With
    ``half_block=False`` (room to spare) every matrix row gets its own line.

    Args:
        matrix: (rows, cols) values in [-1, 1] (NaN allowed).
        row_labels: Labels of the rows (default 0, 1, …).
        col_labels: Labels of the columns.
        cursor: (row, col) highlighted cell, whose value is printed under the colour bar.
        title: Title line.
        ascii: Plain characters instead of colours.
        cell_width: Characters per cell.
    """

    matrix: FloatArray
    row_labels: Sequence[str] = ()
    col_labels: Sequence[str] = ()
    cursor: tuple[int, int] | None = None
    title: str = ""
    ascii: bool = False
    cell_width: int = 3
    half_block: bool = True

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.render_lines(options.max_width)

    def render_lines(self, width: int) -> list[Segment]:
        m = np.asarray(self.matrix, dtype=np.float64)
        segs: list[Segment] = []
        for line in self.title.splitlines():
            segs += [Segment(line[:width], Style(bold=True)), Segment.line()]
        if m.ndim != 2 or m.size == 0:
            return [*segs, Segment("no stiffness measurement yet", Style(dim=True)), Segment.line()]
        rows, cols = m.shape
        rl = (
            list(self.row_labels) if len(self.row_labels) == rows else [str(i) for i in range(rows)]
        )
        cl = (
            list(self.col_labels) if len(self.col_labels) == cols else [str(j) for j in range(cols)]
        )
        cw = max(1, self.cell_width)
        pair = self.half_block and not self.ascii
        label_w = (
            max(len(f"{a}·{b}") if pair else len(a) for a, b in zip(rl, [*rl[1:], ""], strict=True))
            + 1
        )
        header = " " * label_w + "".join(c[:cw].center(cw) for c in cl)
        segs += [Segment(header[:width], Style(dim=True)), Segment.line()]
        cur = self.cursor
        step = 2 if pair else 1
        for r in range(0, rows, step):
            lab = (f"{rl[r]}·{rl[r + 1]}" if r + 1 < rows else rl[r]) if pair else rl[r]
            segs.append(Segment(lab.rjust(label_w - 1) + " ", Style(dim=True)))
            for c in range(cols):
                if not pair and not self.ascii:
                    glyph = ("◆" if cur == (r, c) else " ").center(cw)
                    segs.append(
                        Segment(glyph, Style(color="black", bgcolor=diverging(m[r, c]), bold=True))
                    )
                    continue
                if self.ascii:
                    ch = ascii_level(m[r, c]) * cw
                    if cur == (r, c):
                        ch = "[" + ch[1:-1] + "]" if cw >= 3 else "@" * cw
                    segs.append(Segment(ch))
                    continue
                top = diverging(m[r, c])
                bottom = diverging(m[r + 1, c]) if r + 1 < rows else None
                is_cur = cur is not None and cur[1] == c and cur[0] in (r, r + 1)
                if is_cur:
                    # the cursor row gets a marker; the other half keeps its colour
                    mark_top = cur is not None and cur[0] == r
                    glyph = "▲" if mark_top else "▼"
                    fg, bg = ("black", top) if mark_top else ("black", bottom or "default")
                    inner = glyph.center(cw)
                    segs.append(Segment(inner, Style(color=fg, bgcolor=bg, bold=True)))
                else:
                    segs.append(Segment("▀" * cw, Style(color=top, bgcolor=bottom)))
            segs.append(Segment.line())
        segs += self._colour_bar(width, label_w)
        if cur is not None and 0 <= cur[0] < rows and 0 <= cur[1] < cols:
            v = m[cur]
            val = "n/a (no pairs)" if not math.isfinite(v) else f"{v:+.3f}"
            segs += [
                Segment(f"{rl[cur[0]]} → {cl[cur[1]]}: {val}"[:width], Style(bold=True)),
                Segment.line(),
            ]
        return segs

    def _colour_bar(self, width: int, indent: int) -> list[Segment]:
        n = max(10, min(31, width - indent - 8))
        segs = [Segment(" " * indent + "-1 ", Style(dim=True))]
        for i in range(n):
            v = -1 + 2 * i / (n - 1)
            if self.ascii:
                segs.append(Segment(ascii_level(v)))
            else:
                segs.append(Segment("█", Style(color=diverging(v))))
        segs += [Segment(" +1", Style(dim=True)), Segment.line()]
        return segs
