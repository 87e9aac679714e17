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
        hm = Heatmap(
            m.data,
            m.row_labels,
            m.col_labels,
            cursor=app.cursor,
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
