"""The run list: per run its colour, name, state in words, problems and measurement coverage;
shortened and scrolled, keeping the selected run in view, when the runs do not fit."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text

from stiffmon.tui.renderables.axes import asciify, cut, distinct_names

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
    tag: str = ""  # the run's tag in place of its colour box without colours


COMPACT_FIRST = ("finished", "replay")  # compacted before the others when runs do not fit


def shown(sizes: Sequence[int], top: int, height: int) -> int:
    """How many whole runs of ``sizes`` lines fit in ``height`` lines from run ``top``, leaving
    a line for ``↑ N more`` above when ``top`` > 0 and for ``↓ N more`` below when runs are left."""
    avail = height - (1 if top > 0 else 0)
    n = used = 0
    for size in sizes[top:]:
        if used + size > avail:
            break
        used, n = used + size, n + 1
    if top + n < len(sizes):
        while n and used + 1 > avail:
            n -= 1
            used -= sizes[top + n]
    return n


def window_top(sizes: Sequence[int], selected: int, height: int, top: int, follow: bool) -> int:
    """The first run shown: ``top`` moved as little as needed to show run ``selected`` (with
    ``follow``), then up while that shows no fewer runs at the bottom (no empty space)."""
    top = max(0, min(top, len(sizes) - 1))
    if follow:
        top = min(top, selected)
        while top < selected and top + shown(sizes, top, height) <= selected:
            top += 1
    while top > 0 and top - 1 + shown(sizes, top - 1, height) >= top + shown(sizes, top, height):
        top -= 1
    return top


@dataclass
class RunList:
    """Rows of the run list; lines are cut to the width (with …), never wrapped.

    With a ``height`` the rows that do not fit are made shorter and then scrolled: first the
    finished (and replayed) runs other than the selected one take one line each
    (``■ name ✓ 1,500``), then every run but the selected one; if that is still too long, the
    list shows the runs from ``top`` (moved to keep the selected run in view when ``follow``)
    with ``↑ 2 more runs`` / ``↓ 3 more runs, 1 ⚠`` for the ones above and below.

    Args:
        rows: The runs.
        ascii: Only ASCII characters.
        height: Lines available (None: all of them).
        top: The first run shown when they must scroll.
        follow: Move ``top`` to show the selected run.
        no_color: Colours cannot be shown: a visible run's box is its tag (``1 name``), as on
            its curves and read-out values.
    """

    rows: Sequence[RunRow]
    ascii: bool = False
    height: int | None = None
    top: int = 0
    follow: bool = True
    no_color: bool = False

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.layout(options.max_width)[1]

    def layout(self, width: int) -> tuple[int, list[Text]]:
        """(the first run shown, the lines) at ``width``."""
        full = [self.full(r, width) for r in self.rows]
        height = self.height
        if height is None or sum(map(len, full)) <= height:
            return 0, [line for block in full for line in block]
        blocks = full
        for states in (COMPACT_FIRST, None):
            blocks = [
                self.compact(r, width)
                if not r.selected and (states is None or r.state in states)
                else b
                for r, b in zip(self.rows, full, strict=True)
            ]
            if sum(map(len, blocks)) <= height:
                return 0, [line for block in blocks for line in block]
        sizes = [len(b) for b in blocks]
        sel = next((i for i, r in enumerate(self.rows) if r.selected), 0)
        top = window_top(sizes, sel, height, self.top, self.follow)
        n = max(1, shown(sizes, top, height))
        lines = [self.more(self.rows[:top], up=True)] if top > 0 else []
        lines += [line for block in blocks[top : top + n] for line in block]
        if top + n < len(self.rows):
            lines = [*lines[: height - 1], self.more(self.rows[top + n :], up=False)]
        return top, lines[:height]

    def more(self, hidden: Sequence[RunRow], up: bool) -> Text:
        """``↓ 3 more runs, 1 ⚠``: the runs above or below, and how many of them are in trouble."""
        arrow = ("^" if up else "v") if self.ascii else ("↑" if up else "↓")
        text = f"{arrow} {len(hidden)} more run{'s' if len(hidden) > 1 else ''}"
        bad = sum(1 for r in hidden if r.problems or r.state in ("stalled", "lost", "ended"))
        out = Text(text, style="dim", no_wrap=True, overflow=cut(self.ascii))
        if bad:
            out.append(f", {bad} " + ("!" if self.ascii else "⚠"), style=LEVEL_STYLE["warning"])
        return out

    def _box(self, r: RunRow) -> str:
        if self.no_color and r.tag and r.visible:
            return r.tag
        return ("■" if r.visible else "□") if not self.ascii else ("#" if r.visible else ".")

    def _state_style(self, r: RunRow) -> str:
        if r.state == "stalled":
            return LEVEL_STYLE["warning"]
        return LEVEL_STYLE["error" if r.state in ("lost", "ended") else "ok"]

    def compact(self, r: RunRow, width: int) -> list[Text]:
        """One line: ``■ name  ✓ 1,500`` (``⚠`` after it when the run has a problem)."""
        conv = asciify if self.ascii else str
        tail = f" {conv(SYMBOL.get(r.state, '?'))} {r.step:,}"
        warn = (" !" if self.ascii else " ⚠") if r.problems else ""
        room = max(1, width - 2 - len(tail) - len(warn))
        name = conv(r.name)
        if len(name) > room:  # cut where it still differs from the other runs' names
            names = [conv(row.name) for row in self.rows]
            at = next((i for i, row in enumerate(self.rows) if row is r), None)
            name = distinct_names(names, room, self.ascii)[at] if at is not None else name[:room]
            name = name[:room]
        problem = "error" if any("diverged" in p for p in r.problems) else "warning"
        line = Text.assemble(
            (self._box(r) + " ", r.color),
            (name.ljust(room), "bold"),
            (tail, self._state_style(r)),
            (warn, LEVEL_STYLE[problem]),
            no_wrap=True,
            overflow=cut(self.ascii),
        )
        return [line]

    @staticmethod
    def _wrap(text: str, width: int, first: str) -> list[str]:
        """``text`` wrapped at its words to ``width``, after ``first`` on the first line and
        four spaces on the others; a word too long stays whole (cut later, with …)."""
        return textwrap.wrap(
            text,
            max(len(first) + 1, width),
            initial_indent=first,
            subsequent_indent="    ",
            break_long_words=False,
            break_on_hyphens=False,
        ) or [first + text]

    def full(self, r: RunRow, width: int) -> list[Text]:
        """Every line of a run: name, state and step, problems, measurement coverage."""
        conv = asciify if self.ascii else str
        out = [
            Text.assemble(
                (self._box(r) + " ", r.color),
                (conv(r.name), "reverse" if r.selected else "bold"),
                no_wrap=True,
                overflow=cut(self.ascii),
            )
        ]
        state_style = self._state_style(r)
        symbol = "  " + conv(SYMBOL.get(r.state, "?")) + " "
        state = symbol + conv(r.text)
        step = f"step {r.step:,}"
        if len(state) + len(step) + 2 <= width:
            out.append(Text.assemble((state, state_style), ("  " + step, "dim"), no_wrap=True))
        else:
            lines = [state]
            if len(state) > width:
                # "stalled 12s (no step since 149; agent alive)", "no new record for 13s;
                # writer alive": each part on lines below, wrapped at its words ("writer pid
                # 67031" / "gone": the last word is the news); only a word too long for the
                # list (an address) is cut, with …
                words, _, detail = r.text.partition(" (")
                head, *parts = (
                    [words, *detail.removesuffix(")").split("; ")] if detail else r.text.split("; ")
                )
                lines = self._wrap(conv(head), width, symbol)
                for part in parts:
                    lines += self._wrap(conv(part), width, "    ")
            for line in lines:
                out.append(Text(line, style=state_style, no_wrap=True, overflow=cut(self.ascii)))
            # the step whole ("step 1,4…" read as 1,4xx): less indent, then no word
            fits = [t for t in ("    " + step, step, f"{r.step:,}") if len(t) <= width]
            out.append(Text(fits[0] if fits else f"{r.step}", style="dim", no_wrap=True))
        for p in r.problems:
            out.append(
                Text(
                    "  " + conv("⚠ " + p),
                    style=LEVEL_STYLE["error" if "diverged" in p else "warning"],
                    no_wrap=True,
                    overflow=cut(self.ascii),
                )
            )
        for c in r.coverage:  # "sharpness 5/9" / "(not-finite)": why they were skipped, whole
            for line in self._wrap(conv(c), width, "  "):
                out.append(Text(line, style="yellow", no_wrap=True, overflow=cut(self.ascii)))
        return out
