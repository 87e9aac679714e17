"""A multi-series line chart at braille resolution, as a pure Rich renderable.

Hand-written rather than plotext / textual-plot: the chart thins 100k-point series to the column
width with per-column min/max (so spikes survive), draws dashed per-run threshold lines, break-even
markers (:mod:`stiffmon.marks`: ◆ confirmed, ◇ tentative, ✕ diverged, ▲ catapult), marks on
the x axis (skipped measurements), a legend, a step cursor with the value of every curve there,
switches to log-y, and falls back to plain ASCII — all inside one renderable that unit tests can
render to an exact string.

Layout: title (shortened to fit, :func:`~stiffmon.tui.renderables.axes.fit_title`; legend on
the same line when it fits, else on its own line when there is room),
the cursor read-out, the plot rows with the y axis, the x axis with ┬ at every tick, the tick
labels centred under their ┬ and the x-axis caption.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.style import Style

from stiffmon.tui.renderables.axes import (
    asciify,
    fit_title,
    fmt_tick,
    log_labels,
    log_ticks,
    nice_ticks,
    row_segments,
    style_of,
    tick_labels,
)
from stiffmon.tui.renderables.chart_items import (
    HLine,
    Line,
    Marker,
    StepLine,
    XMark,
    tags,
)
from stiffmon.tui.renderables.raster import ASCII_SYMBOLS, raster, row_of
from stiffmon.tui.renderables.readout import DASH, cursor_readout

NO_POSITIVE = "no positive values to draw on a log axis (l: linear y axis)"
"""What a log-y chart says when its data are all zero or negative."""


def _centred(text: str, width: int, rows: int) -> list[str]:
    """``rows`` lines of ``width`` cells, ``text`` centred in the middle one; a text too wide
    wraps onto the rows around it, each of its lines (``\n``) on lines of its own (cut only
    when even those are too few)."""
    wrapped = [
        part
        for line in text.split("\n")
        for part in (textwrap.wrap(line, width) if len(line) > width else [line])
    ]
    wrapped = wrapped[:rows]
    top = rows // 2 - (len(wrapped) - 1) // 2
    out = [""] * rows
    for i, line in enumerate(wrapped):
        out[min(rows - len(wrapped), max(0, top)) + i] = line
    return [line.center(width)[:width] for line in out]


@dataclass
class LineChart:
    """Multi-series line chart at braille resolution (2×4 dots per character).

    Args:
        lines: Series to draw, later ones on top.
        hlines: Dashed horizontal lines.
        markers: Symbols drawn last.
        title: Title line (empty: none).
        log_y: Logarithmic y axis (non-positive values are dropped).
        ascii: Plain ASCII: ``*`` points, ``-`` dashes, ``|`` / ``-`` / ``+`` axes.
        height: Rows including axes (default: what the console offers, else 12).
        x_label: Caption under the x axis.
        y_range: Fixed (lo, hi) for the y axis.
        x_range: Fixed (lo, hi) for the x axis (zoom); data outside is not drawn.
        empty_text: Shown when there is nothing to draw.
        log_empty_text: Shown instead when there is data but log-y cannot draw it (every value
            is zero or negative).
        legend: Show a legend (label of every line) when there is more than one labelled line.
        cursor_x: Draw a cursor at this x and the value of every line there.
        x_marks: Symbols on the x axis.
        x_span: The x range the data belong to (e.g. the runs' steps so far): the axis spans
            it, so that charts of series that stop early (or one measurement) line up.
        steplines: Dashed step lines (values held from one x to the next).
        no_color: Colours cannot be shown (``NO_COLOR``): each label gets a tag (``1``…``9``,
            ``a``…``z``, :func:`tags`) that marks its curves' last points, stands before it in
            the legend (``1 lr=0.01``) and before its values in the read-out (``1 0.452``,
            ``╌1 40`` for its threshold), so no number or curve relies on its colour.
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
    x_range: tuple[float, float] | None = None
    empty_text: str = "no data yet"
    log_empty_text: str = NO_POSITIVE
    legend: bool = True
    cursor_x: float | None = None
    x_marks: Sequence[XMark] = ()
    x_span: tuple[float, float] | None = None
    steplines: Sequence[StepLine] = ()
    no_color: bool = False
    plot_box: tuple[int, int, float, float] | None = None  # set when drawn: left, width, x0, x1
    _title: str = field(default="", init=False, repr=False)  # the title before asciify

    def _has_points(self) -> bool:
        """Whether any line has a finite point (in the zoom window), drawable or not."""
        for ln in self.lines:
            ok = np.isfinite(ln.x) & np.isfinite(ln.y)
            if self.x_range is not None:
                ok &= (ln.x >= self.x_range[0]) & (ln.x <= self.x_range[1])
            if ok.any():
                return True
        return False

    def _bounds(self) -> tuple[float, float, float, float] | None:
        xs, ys = [], []
        for ln in self.lines:
            ok = np.isfinite(ln.x) & np.isfinite(ln.y)
            if self.log_y:
                ok &= ln.y > 0
            if self.x_range is not None:
                ok &= (ln.x >= self.x_range[0]) & (ln.x <= self.x_range[1])
            if ok.any():
                xs += [float(ln.x[ok].min()), float(ln.x[ok].max())]
                ys += [float(ln.y[ok].min()), float(ln.y[ok].max())]
        if not xs:
            return None
        data_top = max(ys)
        x_lo, x_hi = (min(xs), max(xs)) if self.x_range is None else self.x_range
        levels = [h.y for h in self.hlines]
        for sl in self.steplines:
            levels += sl.visible(x_lo, x_hi).tolist()
        for v in levels:  # thresholds far above the data would flatten it: leave them off
            if math.isfinite(v) and (v > 0 or not self.log_y) and v <= 2 * abs(data_top) + 1e-12:
                ys.append(v)
        for m in self.markers:
            if math.isfinite(m.y) and (m.y > 0 or not self.log_y):
                ys.append(m.y)
        x0, x1 = (min(xs), max(xs)) if self.x_range is None else self.x_range
        y0, y1 = (min(ys), max(ys)) if self.y_range is None else self.y_range
        if self.log_y:
            y0, y1 = math.log10(y0), math.log10(y1)
        if y1 - y0 < 1e-12 * max(1.0, abs(y1)):
            pad = abs(y0) * 0.1 or 1.0
            y0, y1 = y0 - pad, y1 + pad
        span = self.x_span
        if self.x_range is None and span is not None and span[0] <= x0 <= span[1]:
            x0, x1 = min(x0, span[0]), max(x1, span[1])  # the runs' steps, like the other charts
        if x1 <= x0:  # one point: a range around it, not 500 500 501
            pad = abs(x0) * 0.1 or 1.0
            x0, x1 = x0 - pad, x1 + pad
        return x0, x1, y0, y1

    def __post_init__(self) -> None:
        self._title = self.title
        if self.ascii:
            self.title, self.x_label = asciify(self.title), asciify(self.x_label)
            self.empty_text = asciify(self.empty_text)
            self.log_empty_text = asciify(self.log_empty_text)
            self.lines = [replace(ln, label=asciify(ln.label)) for ln in self.lines]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(8, options.max_width)
        height = self.height or options.height or 12
        yield from self.render_lines(width, max(5, height))

    def _legend(self) -> list[tuple[str, str]]:
        seen: dict[str, str] = {}
        for ln in self.lines:
            if ln.label and ln.label not in seen:
                seen[ln.label] = ln.color
        return list(seen.items()) if self.legend and len(seen) > 1 else []

    def _header(self, width: int, rows: int) -> list[list[Segment]]:
        """Title and legend lines (each a list of segments, without newline)."""
        bold = Style(bold=True)
        items = self._legend()
        box = "#" if self.ascii else "■"
        tag = tags(self.lines) if self.no_color else {}
        item_len = 3  # per label: its box or tag and a space (its own trailing space may be cut)
        legend_len = sum(len(lab) + item_len for lab, _ in items)
        legend = [
            seg
            for lab, color in items
            for seg in (Segment(f" {tag.get(lab, box)}", style_of(color)), Segment(f" {lab} "))
        ]
        out: list[list[Segment]] = []
        if self.title:
            title = fit_title(self._title, width, self.ascii)  # whole when it fits
            if items and len(title) + legend_len <= width:
                return [
                    [
                        Segment(title, bold),
                        *legend,
                        Segment(" " * (width - len(title) - legend_len)),
                    ]
                ]
            out.append([Segment(title.ljust(width), bold)])
        if items and rows >= 10:
            if legend_len > width:  # drop labels from the end until it fits, say how many
                keep, total = [], 0
                for i, (lab, color) in enumerate(items):
                    rest = len(items) - i - 1
                    more = len(f"+{rest}") if rest else 0
                    if total + len(lab) + item_len + more > width:
                        break
                    keep.append((lab, color))
                    total += len(lab) + item_len
                legend = [
                    s
                    for lab, color in keep
                    for s in (
                        Segment(f" {tag.get(lab, box)}", style_of(color)),
                        Segment(f" {lab} "),
                    )
                ]
                if len(keep) < len(items):
                    dropped = f"+{len(items) - len(keep)}"
                    legend.append(Segment(dropped, Style(dim=True)))
                    total += len(dropped)
                legend_len = total
            out.append([*legend, Segment(" " * max(0, width - legend_len))])
        return out

    def render_lines(self, width: int, height: int) -> list[Segment]:
        """Segments of the chart, ``height`` rows of ``width`` cells (newlines included)."""
        segs: list[Segment] = []
        rows = height
        for row in self._header(width, height):
            segs += [*row, Segment.line()]
            rows -= 1
        bounds = self._bounds()
        if bounds is None:
            # data that log-y cannot draw is not "no data yet": say what is true
            text = self.log_empty_text if self.log_y and self._has_points() else self.empty_text
            for line in _centred(text, width, rows):
                segs += [Segment(line, Style(dim=True)), Segment.line()]
            return segs
        x0, x1, y0, y1 = bounds
        if self.cursor_x is not None and rows >= 6:
            for row in self._readout(width, max(1, min(3, rows - 8))):
                segs += [*row, Segment.line()]
                rows -= 1
        plot_rows = max(1, rows - 2)  # x axis line and x tick labels
        yt = self._y_ticks(y0, y1, max(2, min(8, plot_rows // 4)))
        labels = log_labels(yt) if self.log_y else tick_labels(yt)
        lw = max((len(s) for s in labels), default=1) + 1
        pw = max(4, width - lw - 1)
        self.plot_box = (lw + 1, pw, x0, x1)
        cells = raster(self, x0, x1, y0, y1, pw, plot_rows)
        tick_rows = {row_of(t, y0, y1, plot_rows): lab for t, lab in zip(yt, labels, strict=True)}
        axis = Style(dim=True)
        vbar = "|" if self.ascii else "│"
        for r in range(plot_rows):
            lab = tick_rows.get(r, "")
            segs.append(Segment(lab.rjust(lw - 1) + " ", axis))
            segs.append(Segment("┤" if lab and not self.ascii else vbar, axis))
            segs += row_segments(cells[r])
            segs.append(Segment.line())
        axis_row, label_row = self._x_axis(x0, x1, lw, pw, width)
        segs += [*axis_row, Segment.line()]
        segs += [Segment(label_row, axis), Segment.line()]
        return segs

    def _readout(self, width: int, max_rows: int) -> list[list[Segment]]:
        """``step 120: ■ 0.123 ■ 4.56``: the value of every line at the cursor
        (:func:`~stiffmon.tui.renderables.readout.cursor_readout`)."""
        assert self.cursor_x is not None
        cx = self.cursor_x
        where = f"{self.x_label} {fmt_tick(cx) if abs(cx) >= 1e4 else f'{cx:g}'}:"
        tag = tags(self.lines) if self.no_color else {}  # each value behind its line's tag
        values = [(ln.value_at(cx), ln.color, tag.get(ln.label, "")) for ln in self.lines]
        by_color = {ln.color: tag.get(ln.label, "") for ln in self.lines}  # a run's threshold
        values += [
            (sl.value_at(cx), sl.color, DASH + by_color.get(sl.color, "")) for sl in self.steplines
        ]
        return cursor_readout(where, values, width, max_rows, ascii_only=self.ascii)

    def _y_ticks(self, y0: float, y1: float, n: int) -> list[float]:
        if self.log_y:  # whole decades, every k-th when there are many
            return log_ticks(y0, y1, n + 1) or [y0, y1]  # nice_ticks gives n + 1 too
        return nice_ticks(y0, y1, n)

    def _x_axis(
        self, x0: float, x1: float, lw: int, pw: int, width: int
    ) -> tuple[list[Segment], str]:
        """The axis line (┬ at each labelled tick, marks) and the tick labels under it."""
        axis = Style(dim=True)
        hbar, corner, tick = ("-", "+", "+") if self.ascii else ("─", "└", "┬")
        line: list[tuple[str, str | None]] = [(hbar, None)] * pw
        buf = [" "] * width
        xt = nice_ticks(x0, x1, max(2, pw // 12))
        for t, lab in zip(xt, tick_labels(xt), strict=True):
            c = round((t - x0) / (x1 - x0) * (pw - 1))
            col = lw + 1 + c
            start = min(max(lw, col - len(lab) // 2), width - len(lab))
            if all(ch == " " for ch in buf[max(0, start - 1) : start + len(lab) + 1]):
                buf[start : start + len(lab)] = list(lab)
                line[c] = (tick, None)
        for m in self.x_marks:
            if math.isfinite(m.x) and x0 <= m.x <= x1:
                c = round((m.x - x0) / (x1 - x0) * (pw - 1))
                line[c] = (ASCII_SYMBOLS.get(m.symbol, "x") if self.ascii else m.symbol, m.color)
        if self.cursor_x is not None and x0 <= self.cursor_x <= x1:
            c = round((self.cursor_x - x0) / (x1 - x0) * (pw - 1))
            line[c] = ("^" if self.ascii else "▲", "yellow")
        row = [Segment(" " * lw + corner, axis)]
        for seg in row_segments(line):
            row.append(seg if seg.style is not None else Segment(seg.text, axis))
        text = "".join(buf).rstrip()
        cap = f" {self.x_label}" if self.x_label else ""
        if len(text) + len(cap) <= width:
            text = text.ljust(width - len(cap)) + cap
        return row, text[:width].ljust(width)
