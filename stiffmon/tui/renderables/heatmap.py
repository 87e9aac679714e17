"""The class stiffness heatmap: diverging colours centred at 0, class names, values, cursor."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.style import Style

from stiffmon.tui.renderables.axes import FloatArray, fit_title

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
_GLYPH_LEVELS = "=-·+#"  # the same without colour in Unicode: the sign in the glyph


def ascii_level(v: float, ascii: bool = True) -> str:
    """One character per fifth of [-1, 1] (``=`` ``-`` below 0, ``.`` about 0, ``+`` ``#``
    above; ``·`` for ``.`` unless ``ascii``); ``?`` for NaN."""
    if not math.isfinite(v):
        return "?"
    f = max(-1.0, min(1.0, v))
    return (_ASCII_LEVELS if ascii else _GLYPH_LEVELS)[min(4, int((f + 1) / 2 * 5))]


def glyph_scale(ascii: bool = False, width: int | None = None) -> str:
    """The legend of :func:`ascii_level`'s glyphs as a number line, each glyph between the
    values it stands for: ``-1 =  -.6  -  -.2  ·  +.2  +  +.6  #  +1`` (single spaces where
    ``width`` is narrower)."""
    mid = "." if ascii else "·"
    scale = f"-1 =  -.6  -  -.2  {mid}  +.2  +  +.6  #  +1"
    return scale if width is None or len(scale) <= width else scale.replace("  ", " ")


def short_labels(labels: Sequence[str]) -> tuple[list[str], str]:
    """Labels without their common prefix (``class_0, class_1`` → ``0, 1`` and ``class_``)."""
    if len(labels) < 2:
        return list(labels), ""
    prefix = labels[0]
    for s in labels[1:]:
        while not s.startswith(prefix):
            prefix = prefix[:-1]
    if not prefix or any(len(s) == len(prefix) for s in labels):
        return list(labels), ""
    return [s[len(prefix) :] for s in labels], prefix


def text_colour(bg: str) -> str:
    """Black or white, whichever reads on ``bg`` (#rrggbb)."""
    r, g, b = (int(bg[i : i + 2], 16) for i in (1, 3, 5))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "white"


@dataclass
class Heatmap:
    """Class stiffness heatmap.

    Each class pair is a cell ``cell_width`` characters wide. With ``half_block`` two matrix rows
    share one line through the half block ▀ (top row in the foreground colour, bottom row in the
    background) and row labels name both rows (``0·1``); otherwise every row gets ``cell_height``
    lines and, when a cell is at least 5 characters wide, its value printed inside. Column labels
    that do not fit a cell lose their common prefix (named in the header line).

    Args:
        matrix: (rows, cols) values in [-1, 1] (NaN allowed).
        row_labels: Labels of the rows (default 0, 1, …).
        col_labels: Labels of the columns.
        cursor: (row, col) highlighted cell, whose value is printed under the colour bar.
        title: Title line(s).
        ascii: Plain characters instead of colours.
        color: False where colours cannot be shown (``NO_COLOR``): the cells carry the value's
            sign and size in glyphs (:func:`ascii_level`), named by a scale under the map.
        cell_width: Characters per cell.
        half_block: Two rows per line.
        cell_height: Lines per row (without half blocks).
        values: Print values in cells wide enough.
    """

    matrix: FloatArray
    row_labels: Sequence[str] = ()
    col_labels: Sequence[str] = ()
    cursor: tuple[int, int] | None = None
    title: str = ""
    ascii: bool = False
    color: bool = True
    cell_width: int = 3
    half_block: bool = True
    cell_height: int = 1
    values: bool = False

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.render_lines(options.max_width)

    @property
    def glyphs(self) -> bool:
        """Whether the cells are characters (ASCII or no colour), not colours."""
        return self.ascii or not self.color

    def render_lines(self, width: int) -> list[Segment]:
        m = np.asarray(self.matrix, dtype=np.float64)
        segs: list[Segment] = []
        for line in self.title.splitlines():  # cut with …, never mid-word
            segs += [Segment(fit_title(line, width, self.ascii), Style(bold=True)), Segment.line()]
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
        prefix = ""
        if any(len(c) > cw - 1 for c in cl):
            cl, prefix = short_labels(cl)
        pair = self.half_block and not self.glyphs
        label_w = (
            max(len(f"{a}·{b}") if pair else len(a) for a, b in zip(rl, [*rl[1:], ""], strict=True))
            + 1
        )
        header = " " * label_w + "".join(c[:cw].center(cw) for c in cl)
        if prefix and len(header) + len(prefix) + 3 <= width:
            header += f"  ({prefix}…)"
        segs += [Segment(header[:width], Style(dim=True)), Segment.line()]
        cur = self.cursor
        if pair:
            for r in range(0, rows, 2):
                lab = f"{rl[r]}·{rl[r + 1]}" if r + 1 < rows else rl[r]
                segs.append(Segment(lab.rjust(label_w - 1) + " ", Style(dim=True)))
                segs += self._pair_row(m, r, cw)
                segs.append(Segment.line())
        else:
            for r in range(rows):
                for k in range(max(1, self.cell_height)):
                    lab = rl[r] if k == (self.cell_height - 1) // 2 else ""
                    segs.append(Segment(lab.rjust(label_w - 1) + " ", Style(dim=True)))
                    mid = k == (self.cell_height - 1) // 2
                    segs += self._full_row(m, r, cw, mid)
                    segs.append(Segment.line())
        segs += self._colour_bar(width, label_w)
        if cur is not None and 0 <= cur[0] < rows and 0 <= cur[1] < cols:
            v = m[cur]
            val = "n/a (no pairs)" if not math.isfinite(v) else f"{v:+.3f}"
            name = self.col_labels[cur[1]] if len(self.col_labels) == cols else cl[cur[1]]
            arrow = "->" if self.ascii else "→"
            segs += [
                Segment(f"{rl[cur[0]]} {arrow} {name}: {val}"[:width], Style(bold=True)),
                Segment.line(),
            ]
        return segs

    def _full_row(self, m: FloatArray, r: int, cw: int, mid: bool) -> list[Segment]:
        out = []
        for c in range(m.shape[1]):
            v = float(m[r, c])
            is_cur = self.cursor == (r, c)
            if self.glyphs:
                ch = ascii_level(v, self.ascii) * cw
                if is_cur:
                    ch = "[" + ch[1:-1] + "]" if cw >= 3 else "@" * cw
                elif mid and self.values and cw >= 6 and math.isfinite(v):
                    ch = f"{v:+.2f}".center(cw)
                out.append(Segment(ch))
                continue
            bg = diverging(v)
            text = " " * cw
            if mid and self.values and cw >= 5:
                text = (f"{v:+.2f}" if math.isfinite(v) else "n/a")[: cw - 1].center(cw)
            if is_cur and mid:
                text = ("[" + text.strip() + "]" if cw >= 7 else "◆").center(cw)
            out.append(Segment(text, Style(color=text_colour(bg), bgcolor=bg, bold=is_cur)))
        return out

    def _pair_row(self, m: FloatArray, r: int, cw: int) -> list[Segment]:
        out = []
        rows = m.shape[0]
        cur = self.cursor
        for c in range(m.shape[1]):
            top = diverging(m[r, c])
            bottom = diverging(m[r + 1, c]) if r + 1 < rows else None
            if cur is not None and cur[1] == c and cur[0] in (r, r + 1):
                mark_top = cur[0] == r
                glyph = "▲" if mark_top else "▼"
                bg = top if mark_top else (bottom or "default")
                out.append(Segment(glyph.center(cw), Style(color="black", bgcolor=bg, bold=True)))
            else:
                out.append(Segment("▀" * cw, Style(color=top, bgcolor=bottom)))
        return out

    def _colour_bar(self, width: int, indent: int) -> list[Segment]:
        if not self.ascii and not self.color:
            scale = " " * indent + glyph_scale(width=width - indent)
            return [Segment(scale[:width], Style(dim=True)), Segment.line()]
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
