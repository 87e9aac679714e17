"""The key help screen, generated from the app's bindings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.scrollbar import ScrollBarRender
from textual.widgets import Static

from stiffmon import __version__
from stiffmon.tui.renderables.axes import asciify

KEY_NAMES = {
    "question_mark": "?",
    "left_square_bracket": "[",
    "right_square_bracket": "]",
    "plus,equals_sign": "+",
    "minus": "-",
    "left": "←",
    "right": "→",
    "less_than_sign": "<",
    "greater_than_sign": ">",
    "comma": ",",
    "full_stop": ".",
    "slash": "/",
    "escape": "esc",
}

GAP = 2
"""Cells between a key and its action, and between the two column pairs."""


class AsciiScrollBarRender(ScrollBarRender):
    """Textual's scroll bar without its ``▁▂▃`` partial blocks: the thumb in reverse video."""

    VERTICAL_BARS: ClassVar[list[str]] = [" "] * 8
    HORIZONTAL_BARS: ClassVar[list[str]] = [" "] * 8


@dataclass
class KeyTable:
    """Key / action rows in two column pairs where they fit whole, else one.

    A key is never cut (``esc`` read as ``…`` on a narrow screen): its column is as wide as the
    widest key, and an action too long for what is left wraps onto the next line.
    """

    keys: list[tuple[str, str]]
    ascii: bool = False

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        keys = [(asciify(k), asciify(a)) for k, a in self.keys] if self.ascii else self.keys
        kw = max((len(k) for k, _ in keys), default=1)
        aw = max((len(a) for _, a in keys), default=1)
        pairs = 2 if 2 * (kw + aw) + 3 * GAP <= options.max_width else 1
        rows = (len(keys) + pairs - 1) // pairs
        table = Table(box=None, header_style="bold", padding=(0, GAP, 0, 0), pad_edge=False)
        for _ in range(pairs):
            table.add_column("key", style="bold cyan", no_wrap=True, min_width=kw)
            table.add_column("action", overflow="fold")
        for i in range(rows):
            table.add_row(*(c for p in range(pairs) for c in _at(keys, i + p * rows)))
        yield table


def _at(keys: list[tuple[str, str]], i: int) -> tuple[str, str]:
    return keys[i] if i < len(keys) else ("", "")


class HelpScreen(ModalScreen[None]):
    """Two columns of key / action from the app's bindings (one on a narrow screen)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,question_mark", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        ascii_only = bool(getattr(self.app, "ascii", False))
        keys = [
            (KEY_NAMES.get(b.key, b.key), b.description)
            for b in self.app.BINDINGS
            if isinstance(b, Binding) and b.description and b.key != "ctrl+c"
        ]
        about = (
            f"stiffmon {__version__}: keys (esc closes; mouse: wheel zooms, drag pans, "
            "click sets the cursor)"
        )
        title = Text(asciify(about) if ascii_only else about, style="bold")  # wraps to the box
        with VerticalScroll(id="help-box") as box:
            if ascii_only:
                # this box's bars only (Textual's renderer is a class variable)
                box.vertical_scrollbar.renderer = AsciiScrollBarRender  # type: ignore[misc]
                box.horizontal_scrollbar.renderer = AsciiScrollBarRender  # type: ignore[misc]
            yield Static(Group(title, KeyTable(keys, ascii_only)), id="help-table")
