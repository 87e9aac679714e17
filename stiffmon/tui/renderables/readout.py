"""The chart's cursor read-out: every line's value at the cursor, never one dropped silently."""

from __future__ import annotations

import math

from rich.segment import Segment
from rich.style import Style

from stiffmon.tui.renderables.axes import asciify, fmt_value, style_of

DASH = "╌"  # the box of a dashed step line's value (a threshold), not a curve's ■


def cursor_readout(
    where: str,
    values: list[tuple[float, str, str]],
    width: int,
    max_rows: int,
    *,
    ascii_only: bool = False,
) -> list[list[Segment]]:
    """``step 120: ■ 0.123 ■ 4.56 ╌ 18``: ``where``, then each ``(value, colour, box)`` behind
    its box (``■`` where ``box`` is empty; :data:`DASH` for a dashed line's; where colours
    cannot be shown, the line's tag, ``1`` or ``╌1``) in its colour.

    Never drops a value silently: when the values do not fit on one row they are written
    compactly (``■0.123``), then over up to ``max_rows`` rows, and what still does not fit is
    counted (``+2 more``). A value that is not finite reads as :func:`fmt_value` writes it (``—``
    for NaN: no current value).
    """
    best: tuple[list[list[Segment]], int] | None = None
    for n_rows in (1, max_rows) if max_rows > 1 else (1,):
        for compact in (False, True):
            rows, placed = _pack(where, values, width, n_rows, compact, ascii_only)
            if placed == len(values):
                return rows
            if best is None or placed > best[1]:
                best = (rows, placed)
    assert best is not None
    return best[0]


def _pack(
    where: str,
    values: list[tuple[float, str, str]],
    width: int,
    max_rows: int,
    compact: bool,
    ascii_only: bool,
) -> tuple[list[list[Segment]], int]:
    """The read-out packed into at most ``max_rows`` rows: (rows, values placed)."""
    boxes = [
        (asciify(b.replace(DASH, "-")) if b else "#") if ascii_only else (b or "■")
        for _, _, b in values
    ]
    # compact: the value right after its box (■0.123), but a tag's value after a space (1 0.123,
    # not 10.123)
    texts = [
        f"{' ' if not compact or b[-1:].isalnum() else ''}"
        f"{fmt_value(v) if not compact or not math.isfinite(v) else f'{v:.3g}'}"
        for v, _, b in values
    ]
    if ascii_only:
        texts = [asciify(t) for t in texts]
    indent = " " * min(len(where), max(0, width // 4))
    rows: list[list[Segment]] = []
    row, used, start = [Segment(where, Style(bold=True))], len(where), len(where)
    k, n = 0, len(texts)
    while k < n:
        w = len(texts[k]) + len(boxes[k]) + 1
        last_row = len(rows) == max_rows - 1
        rest = n - k - 1
        tail = len(f" +{rest} more") if last_row and rest else 0
        if used + w + tail <= width:
            row += [Segment(f" {boxes[k]}", style_of(values[k][1])), Segment(texts[k])]
            used += w
            k += 1
            continue
        if last_row or used == start:
            break
        rows.append([*row, Segment(" " * max(0, width - used))])
        row, used = [Segment(indent)], len(indent)
        start = used
    if k < n:
        more = f" +{n - k} more"[: max(0, width - used)]
        row.append(Segment(more, Style(bold=True)))
        used += len(more)
    rows.append([*row, Segment(" " * max(0, width - used))])
    return rows, k
