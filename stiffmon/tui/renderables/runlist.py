"""The run list: per run its colour, name, state in words, problems and measurement coverage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text

from stiffmon.tui.renderables.axes import asciify, cut

SYMBOL = {
    "live": "●",
    "stalled": "◌",
    "lost": "✗",
    "ended": "✗",
    "finished": "✓",
    "replay": "▷",
}
LEVEL_STYLE = {"ok": "dim", "warning": "yellow", "error": "bold red"}


@dataclass(frozen=True)
class RunRow:
    """What the list says about one run."""

    name: str
    color: str
    visible: bool
    selected: bool
    state: str  # a Health.state
    text: str  # a Health.text
    level: str  # a Health.level
    step: int
    problems: Sequence[str] = ()  # short: "diverged @19", "gram disabled"
    coverage: Sequence[str] = field(default_factory=tuple)  # "sharpness 3/9 (cap)"


@dataclass
class RunList:
    """Rows of the run list; lines are cut to the width (with …), never wrapped."""

    rows: Sequence[RunRow]
    ascii: bool = False

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        conv = asciify if self.ascii else str
        for r in self.rows:
            box = ("■" if r.visible else "□") if not self.ascii else ("#" if r.visible else ".")
            head = Text.assemble(
                (box + " ", r.color),
                (conv(r.name), "reverse" if r.selected else "bold"),
                no_wrap=True,
                overflow=cut(self.ascii),
            )
            yield head
            state_style = LEVEL_STYLE["error" if r.state in ("lost", "ended") else "ok"]
            if r.state == "stalled":
                state_style = LEVEL_STYLE["warning"]
            symbol = "  " + conv(SYMBOL.get(r.state, "?")) + " "
            state = symbol + conv(r.text)
            step = f"step {r.step:,}"
            if len(state) + len(step) + 2 <= options.max_width:
                yield Text.assemble((state, state_style), ("  " + step, "dim"), no_wrap=True)
            else:
                words, _, detail = r.text.partition(" (")
                lines = [state]
                if len(state) > options.max_width and detail:
                    # "stalled 12s (no step since 149; agent alive)": the bracket on lines below
                    lines = [symbol + conv(words)]
                    lines += ["    " + conv(w) for w in detail.removesuffix(")").split("; ")]
                for line in lines:
                    yield Text(line, style=state_style, no_wrap=True, overflow=cut(self.ascii))
                yield Text("    " + step, style="dim", no_wrap=True, overflow=cut(self.ascii))
            for p in r.problems:
                yield Text(
                    "  " + conv("⚠ " + p),
                    style=LEVEL_STYLE["error" if "diverged" in p else "warning"],
                    no_wrap=True,
                    overflow=cut(self.ascii),
                )
            for c in r.coverage:
                yield Text("  " + conv(c), style="yellow", no_wrap=True, overflow=cut(self.ascii))
