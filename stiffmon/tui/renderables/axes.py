"""Axis helpers shared by the charts: round tick values, short tick labels, min/max thinning."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.style import Style
from rich.text import Text

from stiffmon.marks import ASCII_MARKS

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


def fmt_tick(v: float, digits: int = 3) -> str:
    """Short tick label of ``digits`` significant digits: 0.05, 1.2k, 3e-5, 1e29 ..."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        mantissa, exponent = f"{v:.{max(0, digits - 3)}e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    if a >= 1e3:
        return f"{v / 1e3:.{digits}g}k"
    return f"{v:.{digits}g}"


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """:func:`fmt_tick` labels, with more digits where the short ones would repeat or misstate a
    tick (2.095, 2.1, 2.105 all read ``2.1`` at 3 digits; 1e5, 1.5e5, 2e5 read ``1e5``, ``2e5``,
    ``2e5``; 12,625 reads ``12.6k``)."""
    labels: list[str] = []
    for digits in range(3, 13):
        labels = [fmt_tick(t, digits) for t in ticks]
        if len(set(labels)) == len(labels) and all(
            math.isclose(_value(lab), t, rel_tol=1e-9, abs_tol=1e-300)
            for lab, t in zip(labels, ticks, strict=True)
        ):
            break
    return labels


def _value(label: str) -> float:
    """The number a :func:`fmt_tick` label reads as."""
    return float(label[:-1]) * 1e3 if label.endswith("k") else float(label)


def _decade_steps() -> Iterator[int]:
    """1, 2, 3, 5, 10, 20, 50, 100, 200, 500 ... decades between log-axis ticks."""
    yield from (1, 2, 3, 5)
    for j in itertools.count(1):
        yield from (10**j, 2 * 10**j, 5 * 10**j)


def log_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Decades (integer powers of ten, in log10 units) in [lo, hi]: every one, or every k-th
    (k = 1, 2, 3, 5, 10, 20, 50 ...) so that at most ``n`` remain, all multiples of k."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    d0, d1 = math.ceil(lo - 1e-9), math.floor(hi + 1e-9)
    if d1 < d0:
        return []
    for k in _decade_steps():
        first = -(-d0 // k) * k
        ticks = [float(d) for d in range(first, d1 + 1, k)]
        if len(ticks) <= max(1, n) or k > d1 - d0:
            return ticks
    return []  # pragma: no cover - the loop always returns


def log_labels(ticks: list[float]) -> list[str]:
    """Labels of log-axis ticks (log10 units): all plain (0.01, 1, 1k) when every tick is a
    decade from 1e-3 to 1e4, else all as powers of ten (1e0, 1e5, 1e10), never a mixture."""
    decades = all(t == int(t) for t in ticks)
    if decades and any(not -3 <= t <= 4 for t in ticks):
        return [f"1e{int(t)}" for t in ticks]
    return [fmt_tick(10**t) for t in ticks]


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
    "↓": "v",
    "▶": ">",
    "⏸": "||",
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
_ASCII_TABLE = str.maketrans({**_ASCII, **ASCII_MARKS})


_CLAUSE = re.compile(r"[,;] (?![^(]*\))")  # a clause break outside parentheses
_LAST_PAREN = re.compile(r" ?\([^()]*\)$")
_PAREN = re.compile(r" ?\([^()]*\)")


def _shorter_titles(title: str) -> list[str]:
    """``title`` and shorter forms of it, most complete first: without the ``— run`` part,
    then without its trailing clauses (``, …`` / ``; …``), then without its parentheses, the
    last first."""
    head, sep, _run = title.rpartition(" — ")
    if not sep:
        head = title
    out = [title, head]
    out += [head[: m.start()] for m in reversed(list(_CLAUSE.finditer(head)))]
    short = out[-1]
    while (m := _LAST_PAREN.search(short)) is not None and m.start() > 0:
        short = short[: m.start()]
        out.append(short)
    out.append(_PAREN.sub("", short))
    return out


def fit_title(title: str, width: int, ascii: bool = False) -> str:
    """A title in at most ``width`` cells that never ends in a word cut short.

    Shortened the way titles are written (``main, detail — run``): the run is dropped first,
    then trailing clauses, then parentheses; when even the main part is too long it is cut
    with ``…`` (``...`` in ASCII), so that two titles side by side never run into each other.
    """
    if width <= 0:
        return ""
    fix = asciify if ascii else str
    candidates = [fix(t).strip() for t in _shorter_titles(title)]
    for t in candidates:
        if len(t) <= width:
            return t
    dots = "..." if ascii else "…"
    if width <= len(dots):
        return candidates[-1][:width]
    return candidates[-1][: width - len(dots)].rstrip() + dots


def cut_at_words(text: Text, width: int, ascii: bool = False) -> Text:
    """``text`` cut to ``width`` cells at a space, ending in ``…`` (``...`` in ASCII).

    Rich cuts a line too long anywhere, a number too: ``break-even 8…`` for 80, ``λ1_H 1…`` for
    16.1. Cut at a word, a number goes whole or not at all, and a whole one ends ``80 …``. A
    line without a space in reach is cut where it must. ``width`` 0 (not laid out yet) leaves
    ``text`` as it is.
    """
    if width <= 0 or text.cell_len <= width:
        return text
    dots = "..." if ascii else "…"
    plain, room = text.plain, max(0, width - len(dots))
    at = plain.rfind(" ", 0, room + 1)
    # a whole number keeps a space before the dots (``80 …``: not read as 80-something)
    while at > 0 and plain[:at].rstrip()[-1:].isdigit() and len(plain[:at].rstrip()) >= room:
        at = plain.rfind(" ", 0, at)
    out = text[: at if at > 0 else room]
    out.rstrip()
    out.append(" " + dots if out.plain[-1:].isdigit() else dots)
    return out


class WordCutLines:
    """``lines``, one per row, each cut at a word to the width it is drawn at
    (:func:`cut_at_words`): a resize re-cuts them, a number is never cut in half."""

    def __init__(self, lines: Sequence[Text], ascii: bool = False) -> None:
        self.lines, self.ascii = list(lines), ascii

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        text = Text("\n").join(cut_at_words(t, options.max_width, self.ascii) for t in self.lines)
        text.no_wrap, text.overflow = True, cut(self.ascii)
        yield text


def cut(ascii: bool) -> Literal["crop", "ellipsis"]:
    """How Rich cuts a line too long: with … unless only ASCII may be drawn."""
    return "crop" if ascii else "ellipsis"


def asciify(text: str) -> str:
    """``text`` with the monitor's non-ASCII characters spelt in ASCII (others become ``?``)."""
    out = text.translate(_ASCII_TABLE)
    return out if out.isascii() else out.encode("ascii", "replace").decode()


_SEPARATORS = " =,_-/:;"


def distinct_names(names: Sequence[str], width: int, ascii: bool = False) -> list[str]:
    """``names`` cut to ``width`` characters so that names that differ stay different.

    A cut that keeps each name's head loses what runs named after their settings differ in
    (``lr lr=0.05`` and ``lr lr=0.2`` both became ``lr lr=…``). A name too long keeps where the
    names start to differ (after the prefix they share, from its last separator): its tail when
    that covers it (``…lr=0.05``), else the part from there (``…lr=0.05 wd…``); one name, or
    names that share no prefix, keep head and tail (``resn…=0.05``).
    """
    dots = "..." if ascii else "…"
    width = max(width, len(dots) + 2)
    if all(len(n) <= width for n in names):
        return list(names)
    d = 0
    if len(names) > 1:
        columns = enumerate(zip(*names, strict=False))  # up to the shortest name
        shared = next((i for i, cs in columns if len(set(cs)) > 1), None)
        common = names[0][: shared if shared is not None else min(map(len, names))]
        d = max((i + 1 for i, c in enumerate(common) if c in _SEPARATORS), default=0)

    def middle(name: str) -> str:
        keep = width - len(dots)
        head = keep // 3  # the tail says more: settings are most often at the end
        return name[:head] + dots + name[len(name) - (keep - head) :]

    out = []
    for name in names:
        start = len(name) - (width - len(dots))
        if len(name) <= width:
            out.append(name)
        elif start <= d:  # from a word's start where one is near enough: not "…et lr=0.2"
            word = next((i for i in range(start, d + 1) if name[i - 1] in _SEPARATORS), start)
            out.append(dots + name[word:].lstrip())
        elif d:
            out.append(dots + name[d : d + width - 2 * len(dots)] + dots)
        else:
            out.append(middle(name))
    if len(set(out)) < len(set(names)):
        out = [n if len(n) <= width else middle(n) for n in names]
    return out
