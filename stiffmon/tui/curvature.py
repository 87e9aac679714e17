"""Curvature and batch-size drawings: Hessian density (one measurement and its evolution), trace
with its error band, top-k eigenvalues and suggested batch sizes (Cockpit's gradient tests
themselves: :mod:`stiffmon.tui.gradient_tests`).

Pure: functions from the store's :class:`~stiffmon.store.RunData` (and display options) to Rich
renderables, and :class:`DensityMap`, a renderable that unit tests render to exact strings. The
Textual widgets that show them are thin (:mod:`stiffmon.tui.app` / its views).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.segment import Segment
from rich.style import Style
from rich.text import Text

from stiffmon.store import RunData, Snapshot
from stiffmon.tui.gradient_tests import TESTS
from stiffmon.tui.gradient_tests import gradient_tests_chart as gradient_tests_chart
from stiffmon.tui.renderables import (
    HLine,
    Line,
    LineChart,
    asciify,
    fit_title,
    nice_ticks,
    tick_labels,
)
from stiffmon.tui.renderables.axes import cut
from stiffmon.tui.runlines import run_line, series_x, span_of

FloatArray = npt.NDArray[np.float64]

DENSITY = "hessian-density"
TOPK_COLORS = ("#e6550d", "#fd8d3c", "#fdae6b", "#fdd0a2", "#c6dbef", "#9ecae1", "#6baed6")
RunColor = tuple[RunData, str]

# viridis, 5 stops
_SEQ = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
_ASCII = " .:-=+*#%@"


def sequential(f: float) -> str:
    """Colour of f ∈ [0, 1] on viridis; NaN (no data) is dark grey."""
    if not math.isfinite(f):
        return "#303030"
    f = max(0.0, min(1.0, f)) * (len(_SEQ) - 1)
    i = min(int(f), len(_SEQ) - 2)
    t = f - i
    a, b = _SEQ[i], _SEQ[i + 1]
    r, g, bl = (round(a[k] + (b[k] - a[k]) * t) for k in range(3))
    return f"#{r:02x}{g:02x}{bl:02x}"


def bin_average(grid: FloatArray, density: FloatArray, edges: FloatArray) -> FloatArray:
    """Mean density in each bin [edges[i], edges[i+1]], exactly for the piecewise-linear curve.

    Integrates the curve (trapezoids) into a cumulative mass, reads it at the edges (0 below the
    grid, the total above) and divides by the bin widths: narrow peaks are never missed.
    """
    if len(grid) < 2:
        return np.zeros(len(edges) - 1)
    cdf = np.concatenate([[0.0], np.cumsum(np.diff(grid) * 0.5 * (density[1:] + density[:-1]))])
    k = np.clip(np.searchsorted(grid, edges, side="right") - 1, 0, len(grid) - 2)
    u = np.clip(edges, grid[0], grid[-1]) - grid[k]
    slope = (density[k + 1] - density[k]) / np.maximum(grid[k + 1] - grid[k], 1e-300)
    mass = cdf[k] + density[k] * u + 0.5 * slope * u * u  # exact for the linear pieces
    out: FloatArray = np.diff(mass) / np.maximum(np.diff(edges), 1e-300)
    return out


@dataclass
class DensityMap:
    """Step × eigenvalue heatmap of the Hessian density, log-scaled colours (viridis).

    One column per measurement (evenly thinned to the width, the last always kept), eigenvalues
    upwards, two eigenvalue bins per line through the half block ▀. Colour: log10 of the density
    over the ``decades`` below the largest value; lower values are black.

    Args:
        steps: Step of each measurement.
        grids: Eigenvalue grid of each measurement.
        densities: Density on that grid.
        title: Title line(s).
        ascii: Plain characters (`` .:-=+*#%@``) instead of colours.
        height: Lines for the map itself.
        decades: Colour range in powers of ten.
    """

    steps: Sequence[int]
    grids: Sequence[FloatArray]
    densities: Sequence[FloatArray]
    title: str = ""
    ascii: bool = False
    height: int = 10
    decades: float = 4.0
    empty_text: str = "no density measurement yet"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.render_lines(options.max_width)

    def render_lines(self, width: int) -> list[Segment]:
        segs: list[Segment] = []
        for title_line in self.title.splitlines():  # shortened to fit, never cut mid-word
            title = fit_title(title_line, width, self.ascii)
            segs += [Segment(title, Style(bold=True)), Segment.line()]
        if not self.steps:
            return [*segs, Segment(self.empty_text, Style(dim=True)), Segment.line()]
        lo = min(float(g[0]) for g in self.grids)
        hi = max(float(g[-1]) for g in self.grids)
        hi = hi if hi > lo else lo + 1.0
        lines = max(2, self.height)
        bins = lines if self.ascii else 2 * lines
        edges = np.linspace(lo, hi, bins + 1)
        ticks = tick_labels(nice_ticks(lo, hi, 4))
        label_w = max(len(t) for t in ticks) + 1
        avail = max(1, width - label_w)
        n = len(self.steps)
        idx = (
            list(range(n))
            if n <= avail
            else sorted({round(float(i)) for i in np.linspace(0, n - 1, avail)})
        )
        cw = max(1, min(3, avail // len(idx)))
        cols = [bin_average(self.grids[i], self.densities[i], edges) for i in idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log10(np.stack(cols, axis=1))  # (bins, columns), low eigenvalues first
        finite = logs[np.isfinite(logs)]
        top = float(finite.max()) if finite.size else 0.0
        frac = (logs - (top - self.decades)) / self.decades
        frac = np.where(np.isfinite(logs), np.clip(frac, 0.0, 1.0), 0.0)
        tick_rows: dict[int, str] = {}
        for t, s in zip(nice_ticks(lo, hi, 4), ticks, strict=True):
            b = int(np.clip(np.searchsorted(edges, t) - 1, 0, bins - 1))
            tick_rows.setdefault((bins - 1 - b) // (1 if self.ascii else 2), s)
        for line in range(lines):
            segs.append(Segment(tick_rows.get(line, "").rjust(label_w - 1) + " ", Style(dim=True)))
            if self.ascii:
                b = bins - 1 - line
                chars = "".join(
                    _ASCII[min(9, int(frac[b, c] * 9.999))] * cw for c in range(len(idx))
                )
                segs.append(Segment(chars))
            else:
                b_top, b_bot = bins - 1 - 2 * line, bins - 2 - 2 * line
                for c in range(len(idx)):
                    fg = sequential(frac[b_top, c]) if frac[b_top, c] > 0 else "#000000"
                    bg = sequential(frac[b_bot, c]) if frac[b_bot, c] > 0 else "#000000"
                    segs.append(Segment("▀" * cw, Style(color=fg, bgcolor=bg)))
            segs.append(Segment.line())
        first, last = f"step {self.steps[idx[0]]:,}", f"{self.steps[idx[-1]]:,}"
        span = len(idx) * cw
        one = self.steps[idx[0]] == self.steps[idx[-1]]  # one measurement: one label
        axis = first if one else first + last.rjust(max(len(last) + 1, span - len(first)))
        segs += [Segment(" " * label_w + axis[: max(0, width - label_w)], Style(dim=True))]
        segs.append(Segment.line())
        low = f"1e-{self.decades:g}{'x' if self.ascii else '×'}max "
        bar = [Segment(" " * label_w + low, Style(dim=True))]
        for i in range(12):
            f = i / 11
            bar.append(
                Segment(_ASCII[min(9, int(f * 9.999))])
                if self.ascii
                else Segment("█", Style(color=sequential(f)))
            )
        bar += [Segment(" max", Style(dim=True)), Segment.line()]
        return segs + bar


def density_snapshots(rd: RunData) -> list[Snapshot]:
    """The run's ``hessian-density`` measurements, oldest first."""
    return rd.curves.get(DENSITY, [])


def _f(attrs: Mapping[str, object], key: str, spec: str) -> str:
    v = attrs.get(key)
    return format(v, spec) if isinstance(v, int | float) and math.isfinite(v) else "—"


def density_chart(
    rd: RunData, index: int | None, *, log_y: bool, ascii: bool, height: int
) -> RenderableType:
    """The density of one measurement (``index`` into the run's list; None: the latest)."""
    snaps = density_snapshots(rd)
    if not snaps:
        return LineChart(
            [], title=f"Hessian density — {rd.name}", height=height, empty_text=_none(rd, "density")
        )
    i = len(snaps) - 1 if index is None else max(0, min(index, len(snaps) - 1))
    m = snaps[i].msg
    a = dict(m.attrs)
    title = f"density {i + 1}/{len(snaps)}, step {snaps[i].step:,} — {rd.name}"
    info = (
        f"trace {_f(a, 'trace', '.4g')} ± {_f(a, 'trace_stderr', '.2g')}, "
        f"σ {_f(a, 'sigma', '.3g')}, SLQ {_f(a, 'runs', 'd')}×{_f(a, 'steps', 'd')}, "
        f"{_f(a, 'hvps', 'd')} HVPs"
    )
    x = np.asarray(getattr(m, "x", ()), dtype=np.float64)
    y = np.asarray(getattr(m, "y", ()), dtype=np.float64)
    chart = LineChart(
        [Line(x, y, "#21918c", "density")],
        title=title,
        log_y=log_y,
        ascii=ascii,
        height=max(5, height - 1),
        x_label="eigenvalue",
        empty_text="empty density",
    )
    if ascii:
        info = asciify(info)
    return Group(
        chart, Text(info, style="dim", no_wrap=True, overflow="crop" if ascii else "ellipsis")
    )


def density_map(rd: RunData, *, ascii: bool, height: int) -> DensityMap:
    """The evolution of the run's density: step × eigenvalue, log colours."""
    snaps = density_snapshots(rd)
    return DensityMap(
        [s.step for s in snaps],
        [np.asarray(getattr(s.msg, "x", ()), dtype=np.float64) for s in snaps],
        [np.asarray(getattr(s.msg, "y", ()), dtype=np.float64) for s in snaps],
        title=f"density by step (log colour) — {rd.name}",
        ascii=ascii,
        height=max(2, height - 3),
        empty_text="no density measured in this run"
        if rd.finished
        else "no density measurement yet",
    )


def _none(rd: RunData, what: str) -> str:
    """``no … yet``, or, for a run that has ended, that it has none (it will never come)."""
    return f"no {what} in this run (density_every)" if rd.finished else f"no {what} yet"


def trace_chart(
    runs: Sequence[RunColor], *, x_time: bool, log_y: bool, ascii: bool, height: int
) -> LineChart:
    """tr H per run, with its ±2 standard-error band as dim lines."""
    lines = []
    for rd, color in runs:
        s = rd.series("curvature/trace")
        if s is None or not len(s):
            continue
        x = series_x(rd, s.steps, s.times, x_time)
        se = rd.series("curvature/trace_stderr")
        if se is not None and len(se) == len(s):
            band = 2 * np.nan_to_num(se.values, nan=0.0)
            lines += [
                Line(x, s.values - band, "grey42", ""),
                Line(x, s.values + band, "grey42", ""),
            ]
        lines.append(run_line(rd, "curvature/trace", x, s.values, color, rd.name, x_time=x_time))
    return LineChart(
        lines,
        title="Hessian trace (Hutchinson), grey: ±2 standard errors",
        x_span=span_of([rd for rd, _ in runs], x_time),
        log_y=log_y,
        ascii=ascii,
        height=height,
        x_label="seconds" if x_time else "step",
        empty_text=(
            "no trace measurement in these runs (density_every)"
            if runs and all(rd.finished for rd, _ in runs)
            else "no trace measurement yet"
        ),
    )


def topk_chart(rd: RunData, *, x_time: bool, log_y: bool, ascii: bool, height: int) -> LineChart:
    """The top-k Hessian eigenvalues (the sharpness measurement's spectrum) over time."""
    snaps = rd.spectra.get("hessian", [])
    k = max((len(getattr(s.msg, "values", ())) for s in snaps), default=0)
    lines = []
    steps = np.array([s.step for s in snaps], dtype=np.int64)
    times = np.array([s.t for s in snaps], dtype=np.float64)
    x = series_x(rd, steps, times, x_time)
    for j in range(k):
        y = np.array(
            [float(v[j]) if len(v := getattr(s.msg, "values", ())) > j else math.nan for s in snaps]
        )
        lines.append(Line(x, y, TOPK_COLORS[j % len(TOPK_COLORS)], f"λ{j + 1}"))
    return LineChart(
        lines,
        title=f"top-{k} Hessian eigenvalues — {rd.name}" if k else "top-k Hessian eigenvalues",
        x_span=span_of([rd], x_time),
        log_y=log_y,
        ascii=ascii,
        height=height,
        x_label="seconds" if x_time else "step",
        empty_text="no sharpness measurement yet",
    )


def batch_chart(
    runs: Sequence[RunColor],
    test: str,
    *,
    x_time: bool,
    ascii: bool,
    height: int,
    empty_text: str = "no gradient tests yet",
) -> LineChart:
    """Suggested batch size of one test per run (log-y), dashed: the run's actual batch size;
    ``empty_text`` without a line."""
    lines, hlines = [], []
    label = test.removesuffix("_test").replace("_", "-")
    for rd, color in runs:
        s = rd.series(f"noise/suggested_batch/{test}")
        if s is not None and len(s):
            x = series_x(rd, s.steps, s.times, x_time)
            name = f"noise/suggested_batch/{test}"
            lines.append(run_line(rd, name, x, s.values, color, rd.name, x_time=x_time))
        if rd.batch_size:
            hlines.append(HLine(float(rd.batch_size), color))
    return LineChart(
        lines,
        hlines,
        title=f"suggested batch ({label} test), dashed: actual",
        x_span=span_of([rd for rd, _ in runs], x_time),
        log_y=True,
        ascii=ascii,
        height=height,
        x_label="seconds" if x_time else "step",
        empty_text=empty_text,
    )


BATCH_HEADER = "actual B → suggested by norm/inner/ortho (θ)"


def batch_table(runs: Sequence[RunColor], ascii: bool = False) -> RenderableType:
    """A header line, then one line per run: the actual batch size, the latest suggested ones
    and their θ, the numbers first (``sgd: 64 → 301/21/17 (θ 0.9/0.9/5.84)``), so that a
    narrow panel cuts the θ, not them."""
    overflow = cut(ascii)
    rows: list[RenderableType] = []
    for rd, color in runs:
        if rd.series("noise/norm_test") is None:
            continue
        parts = []
        for key, _ in TESTS:
            b = rd.last(f"noise/suggested_batch/{key}")
            parts.append("—" if not math.isfinite(b) else f"{math.ceil(b):,}")
        thetas = "/".join(f"{rd.last(f'noise/theta/{key}'):g}" for key, _ in TESTS)
        actual = f"{rd.batch_size:,}" if rd.batch_size else "?"
        line = f"{actual} → {'/'.join(parts)} (θ {thetas})"
        t = Text(f"{rd.name}: ", style=color, no_wrap=True, overflow=overflow)
        t.append(asciify(line) if ascii else line)
        rows.append(t)
    if not rows:
        return Text("no gradient tests yet", style="dim")
    header = asciify(BATCH_HEADER) if ascii else BATCH_HEADER
    return Group(Text(header, style="dim", no_wrap=True, overflow=overflow), *rows)
