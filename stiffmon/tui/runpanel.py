"""The run list's widget: a thin shell around :class:`~stiffmon.tui.renderables.runlist.RunList`
that keeps where the list is scrolled to (the selected run stays in view; the mouse wheel
scrolls it too, until the selection moves)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Group, RenderableType
from textual import events
from textual.widget import Widget

from stiffmon.tui.renderables.runlist import RunList, RunRow


class RunPanel(Widget):
    """The run list, scrolled to keep the selected run in view."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.rows: Sequence[RunRow] = ()
        self.ascii = False
        self.no_color = False
        self.top = 0  # the first run shown when they do not all fit
        self.follow = True  # move ``top`` to the selected run (off after a wheel scroll)
        self._selected = -1

    def show(self, rows: Sequence[RunRow], ascii: bool = False, no_color: bool = False) -> None:
        """Draw these rows; a new selection is scrolled into view."""
        sel = next((i for i, r in enumerate(rows) if r.selected), 0)
        if sel != self._selected:
            self._selected, self.follow = sel, True
        self.rows, self.ascii, self.no_color = rows, ascii, no_color
        self.refresh()

    def render(self) -> RenderableType:
        size = self.content_size
        runs = RunList(
            self.rows,
            self.ascii,
            height=size.height,
            top=self.top,
            follow=self.follow,
            no_color=self.no_color,
        )
        self.top, lines = runs.layout(size.width)
        return Group(*lines)

    def _scroll(self, by: int) -> None:
        self.top, self.follow = max(0, self.top + by), False
        self.refresh()

    def on_mouse_scroll_down(self, event: events.MouseScrollDown) -> None:
        event.stop()
        self._scroll(1)

    def on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        event.stop()
        self._scroll(-1)
