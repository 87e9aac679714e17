"""A rows × steps heatmap (per-layer stiffness over training): one line per row, one column per
measurement (resampled to the width), step ticks under it and a colour bar."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.style import Style

from stiffmon.tui.renderables.axes import FloatArray, fit_title, nice_ticks, tick_labels
from stiffmon.tui.renderables.heatmap import ascii_level, diverging, glyph_scale


@dataclass
class StepHeatmap:
    """Values (rows × measurements) at increasing ``steps``; colours as the class heatmap.

    Args:
        matrix: (rows, n) values in [-1, 1] (NaN: not measured).
        labels: Row labels (layer names).
        steps: The step of each column.
        title: Title line.
        ascii: Plain characters instead of colours.
        color: False where colours cannot be shown (``NO_COLOR``): glyphs that carry the sign.
        height: Lines available (rows beyond it are summarised as "… N more").
    """

    matrix: FloatArray
    labels: Sequence[str]
    steps: Sequence[int]
    title: str = ""
    ascii: bool = False
    height: int | None = None
    color: bool = True

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.render_lines(options.max_width, self.height or options.height or 24)

    def render_lines(self, width: int, height: int) -> list[Segment]:
        m = np.asarray(self.matrix, dtype=np.float64)
        dim = Style(dim=True)
        segs: list[Segment] = []
        if self.title:
            title = fit_title(self.title, width, self.ascii)  # cut with …, never mid-word
            segs += [Segment(title, Style(bold=True)), Segment.line()]
        if m.ndim != 2 or m.size == 0:
            return [*segs, Segment("no per-layer stiffness yet", dim), Segment.line()]
        rows, n = m.shape
        lw = min(max(len(s) for s in self.labels) + 1, max(8, width // 3))
        pw = max(4, width - lw - 1)
        cw = max(1, min(4, pw // n))
        ncols = min(n, pw // cw)
        idx = np.round(np.linspace(0, n - 1, ncols)).astype(np.int64) if n > ncols else np.arange(n)
        room = max(1, height - (1 if self.title else 0) - 3)
        shown = rows if rows <= room else room - 1
        rh = max(1, min(3, room // max(1, rows)))  # lines per row when there is room
        for r in range(shown):
            lab = self.labels[r]
            lab = lab if len(lab) < lw else ("." if self.ascii else "…") + lab[-(lw - 2) :]
            for k in range(rh):
                text = lab if k == (rh - 1) // 2 else ""
                segs.append(Segment(text.rjust(lw - 1) + " ", dim))
                segs.append(Segment("|" if self.ascii else "│", dim))
                for j in idx.tolist():
                    v = float(m[r, j])
                    if self.ascii or not self.color:
                        segs.append(Segment(ascii_level(v, self.ascii) * cw))
                    else:
                        segs.append(Segment(" " * cw, Style(bgcolor=diverging(v))))
                segs.append(Segment.line())
        if shown < rows:
            segs += [Segment(f"+{rows - shown} more layers".rjust(lw + 10), dim), Segment.line()]
        # step axis
        span = len(idx) * cw
        buf = [" "] * width
        st = np.asarray(self.steps, dtype=np.float64)[idx]
        lo, hi = float(st[0]), float(st[-1])
        xt = nice_ticks(lo, hi, max(2, span // 12))
        for t, lab in zip(xt, tick_labels(xt), strict=True):
            k = int(np.argmin(np.abs(st - t)))
            col = lw + 1 + k * cw
            start = min(max(lw, col - len(lab) // 2), width - len(lab))
            if all(ch == " " for ch in buf[max(0, start - 1) : start + len(lab) + 1]):
                buf[start : start + len(lab)] = list(lab)
        text = "".join(buf).rstrip()
        if len(text) + 5 <= width:
            text = text.ljust(width - 5) + " step"
        segs += [Segment(text[:width], dim), Segment.line()]
        if not self.ascii and not self.color:
            key = " " * lw + glyph_scale(width=width - lw)
            key += "  mean cosine stiffness" if len(key) + 23 <= width else ""
            return [*segs, Segment(key[:width], dim), Segment.line()]
        segs.append(Segment(" " * lw + "-1 ", dim))
        nbar = min(21, max(5, width - lw - 30))
        for i in range(nbar):
            v = -1 + 2 * i / (nbar - 1)
            segs.append(
                Segment(ascii_level(v)) if self.ascii else Segment("█", Style(color=diverging(v)))
            )
        segs += [Segment(" +1 mean cosine stiffness", dim), Segment.line()]
        return segs
