"""Stiffness: the class stiffness heatmap of the selected run, scrubbed through measurements."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text
from textual.containers import Vertical
from textual.widget import Widget

from stiffmon.tui.renderables import Heatmap
from stiffmon.tui.renderables.axes import cut
from stiffmon.tui.views.base import ChartView, View

BLOCKS = ("train-train", "train-val", "val-val")


def scrubbed(snaps: list[Any], scrub: int | None) -> tuple[Any, int]:
    """The measurement at ``scrub`` (None: the latest) and its index."""
    if not snaps:
        return None, -1
    i = len(snaps) - 1 if scrub is None else max(0, min(scrub, len(snaps) - 1))
    return snaps[i], i


def window(
    rows: int,
    cols: int,
    cursor: tuple[int, int],
    width: int,
    free: int,
    row_labels: tuple[str, ...],
    paired: bool = True,
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The rows [r0, r1) and columns [c0, c1) of a map too big for the screen, around the cursor.

    Cells are at least 2 characters wide, so ``(width − labels) // 2`` columns fit; with
    ``paired`` rows (half blocks) two rows share a line, so ``2 · (free − 1)`` rows fit, else
    ``free − 1`` (one line goes to saying which part is shown). The window is centred on the
    cursor and kept inside the matrix (rows from an even one, so paired rows stay paired). None
    when the whole matrix fits.
    """
    rl = row_labels if len(row_labels) == rows else tuple(str(r) for r in range(rows))
    per_line = 2 if paired else 1
    lw = max((len(a) for a in rl), default=1) * per_line + 2  # ``a·b`` (or ``a``) and a space
    fit_c = max(1, (width - lw - 1) // 2)
    fit_r = max(per_line, per_line * (free - 1))
    if cols <= fit_c and rows <= per_line * free:
        return None
    nc, nr = min(cols, fit_c), min(rows, fit_r)
    c0 = max(0, min(cursor[1] - nc // 2, cols - nc))
    r0 = max(0, min(cursor[0] - nr // 2, rows - nr))
    r0 -= r0 % per_line
    return (r0, min(rows, r0 + nr)), (c0, c0 + nc)


def window_words(
    win: tuple[tuple[int, int], tuple[int, int]], rows_all: int, cols_all: int, ascii: bool
) -> str:
    """``rows 0–65 × cols 0–42 of 100 × 100 (shift+arrows)``: which part is shown (a narrow
    screen cuts the key off first)."""
    (r0, r1), (c0, c1) = win
    dash, times = ("-", "x") if ascii else ("–", "×")
    return (
        f"rows {r0}{dash}{r1 - 1} {times} cols {c0}{dash}{c1 - 1} of {rows_all} {times} "
        f"{cols_all} (shift+arrows)"
    )


class Stiffness(View):
    name = "stiffness"
    key = "2"
    title = "stiffness"
    zoomable = False

    def widget(self) -> Widget:
        return Vertical(ChartView(self.heatmap, id="heatmap"), id=self.name)

    def heatmap(self, width: int, height: int) -> RenderableType:
        app = self.app
        rd = self.selected_run()
        block = BLOCKS[app.block_i]
        if rd is None:
            return Text("no runs")
        snaps = rd.matrices.get(f"stiffness/{app.kind}/{block}", [])
        snap, i = scrubbed(snaps, app.scrub)
        if snap is None:
            why = next((e.message for e in rd.events if e.code == "no-class-labels"), "")
            if why:  # it will never come: say why, not "yet"
                return Text(f"{rd.name}: {why}", style="dim")
            return Text(
                f"{rd.name}: no {app.kind} stiffness for {block} yet (b: block, c: cos/sign)",
                style="dim",
            )
        m = snap.msg
        rows, cols = m.data.shape
        app.cursor = (min(app.cursor[0], rows - 1), min(app.cursor[1], cols - 1))
        label_w = max((len(s) for s in m.row_labels), default=2) + 2
        cw = max(2, min(16, (width - label_w - 2) // max(1, cols)))
        free = height - 8  # title (3), header, colour bar, cursor value, hint, margin
        paired = not (app.ascii or app.no_color)  # the Heatmap's half blocks
        win = window(rows, cols, app.cursor, width, free, m.row_labels, paired)
        if win is not None:  # too many classes: the part around the cursor, and which part
            free -= 1
        cell_h = max(1, min(5, free // max(1, rows)))

        def f(key: str) -> str:
            v = m.attrs.get(key)
            return "-" if not isinstance(v, int | float) else format(v, "+.3f")

        done, skipped = rd.coverage("gram")
        cov = f"   measured {done}/{done + skipped} due" if skipped else ""
        title = (
            f"{rd.name}: {app.kind} stiffness, {block}\n"
            f"measurement {i + 1}/{len(snaps)} at step {snap.step:,} (run at {rd.last_step:,})\n"
            f"mean within {f('within')}  between {f('between')}{cov}"
        )
        data, rlab, clab, cursor = m.data, m.row_labels, m.col_labels, app.cursor
        if win is not None:
            (r0, r1), (c0, c1) = win
            data = m.data[r0:r1, c0:c1]
            rlab, clab = tuple(m.row_labels[r0:r1]), tuple(m.col_labels[c0:c1])
            cursor = (app.cursor[0] - r0, app.cursor[1] - c0)
            cw, rows = 2, r1 - r0
            title += f"\n{window_words(win, m.data.shape[0], cols, app.ascii)}"
        hm = Heatmap(
            data,
            rlab,
            clab,
            cursor=cursor,
            title=title,
            ascii=app.ascii,
            color=not app.no_color,
            cell_width=cw,
            half_block=free < rows,
            cell_height=cell_h,
            values=True,
        )
        hint = Text(
            "<-/-> scrub  shift+arrows cell  b block  c cos/sign  [ ] run"
            if app.ascii
            else "←/→ scrub  shift+←→↑↓ cell  b block  c cos/sign  [ ] run",
            style="dim",
            no_wrap=True,
            overflow=cut(app.ascii),
        )
        return Group(hm, hint)
