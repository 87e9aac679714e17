"""The key help screen, generated from the app's bindings."""

from __future__ import annotations

from typing import ClassVar

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from stiffmon import __version__

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


class HelpScreen(ModalScreen[None]):
    """Two columns of key / action from the app's bindings."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,question_mark", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        keys = [
            (KEY_NAMES.get(b.key, b.key), b.description)
            for b in self.app.BINDINGS
            if isinstance(b, Binding) and b.description and b.key != "ctrl+c"
        ]
        half = (len(keys) + 1) // 2
        title = Text(  # the box's width, not the table's: one line where it fits
            f"stiffmon {__version__}: keys (esc closes; mouse: wheel zooms, drag pans, "
            "click sets the cursor)",
            style="bold",
        )
        table = Table(box=None, header_style="bold")
        for _ in range(2):
            table.add_column("key", style="bold cyan", no_wrap=True)
            table.add_column("action", no_wrap=True)
        for i in range(half):
            right = keys[i + half] if i + half < len(keys) else ("", "")
            table.add_row(*keys[i], *right)
        with VerticalScroll(id="help-box"):
            yield Static(Group(title, table), id="help-table")
