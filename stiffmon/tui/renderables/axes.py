"""Axis helpers shared by the charts: round tick values, short tick labels, min/max thinning."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import numpy.typing as npt
from rich.segment import Segment
from rich.style import Style

FloatArray = npt.NDArray[np.float64]


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


def fmt_value(v: float) -> str:
    """A read-out value: 4 significant digits, — for NaN."""
    if not math.isfinite(v):
        return "—" if math.isnan(v) else str(v)
    return f"{v:.4g}"


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


def style_of(color: str | None) -> Style | None:
    """A cached foreground style (None stays None)."""
    if color is None:
        return None
    style = _STYLES.get(color)
    if style is None:
        style = _STYLES[color] = Style(color=color)
    return style


def row_segments(row: list[tuple[str, str | None]]) -> list[Segment]:
    """One Segment per run of cells with the same colour (far fewer objects than cells)."""
    out: list[Segment] = []
    buf: list[str] = []
    current: str | None = None
    for ch, color in row:
        if color != current and buf:
            out.append(Segment("".join(buf), style_of(current)))
            buf = []
        current = color
        buf.append(ch)
    if buf:
        out.append(Segment("".join(buf), style_of(current)))
    return out


_ASCII = {
    "λ": "l",
    "η": "eta",
    "ξ": "xi",
    "β": "beta",
    "Σ": "Sum",
    "—": "-",
    "–": "-",
    "…": "...",
    "·": ".",
    "╌": "-",
    "■": "#",
    "□": ".",
    "◆": "*",
    "◇": "o",
    "▲": "^",
    "▼": "v",
    "×": "x",
    "→": "->",
    "←": "<-",
    "●": "*",
    "◌": "o",
    "✓": "v",
    "✗": "X",
    "⚠": "!",
    "│": "|",
    "─": "-",
    "┊": ":",
    "≥": ">=",
    "≤": "<=",
    "↑": "^",
    "ᵖ": "p",
    "ᴾ": "P",
    "⁻": "^-",
    "¹": "1",
    "₁": "1",
    "̄": "",
    "θ": "theta",
    "ν": "nu",
    "σ": "sigma",
    "±": "+-",
}
_ASCII_TABLE = str.maketrans(_ASCII)


def cut(ascii: bool) -> Literal["crop", "ellipsis"]:
    """How Rich cuts a line too long: with … unless only ASCII may be drawn."""
    return "crop" if ascii else "ellipsis"


def asciify(text: str) -> str:
    """``text`` with the monitor's non-ASCII characters spelt in ASCII (others become ``?``)."""
    out = text.translate(_ASCII_TABLE)
    return out if out.isascii() else out.encode("ascii", "replace").decode()
