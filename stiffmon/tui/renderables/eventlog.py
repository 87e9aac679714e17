"""The event log: one line per event (level, step, time since the run's start, run, text),
newest first, as many as fit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from stiffmon.tui.renderables.axes import asciify, cut, distinct_names

LEVEL_STYLE = {"info": "dim", "warning": "yellow", "error": "bold red"}
STACK_BELOW = 48  # narrower: each event's text under its level, step, time and run


NARROW_RUN = 10  # the run column of a narrow table: a colour alone does not tell 24 runs apart


def short_names(runs: Sequence[str], width: int, ascii: bool = False) -> dict[str, str]:
    """Each distinct run name cut to ``width`` characters, names that differ kept different
    (``…lr=0.0182``, ``…lr=0.1105``): :func:`distinct_names` over the runs of the log."""
    conv = asciify if ascii else str
    names = list(dict.fromkeys(runs))
    return dict(zip(names, distinct_names([conv(n) for n in names], width, ascii), strict=True))


@dataclass(frozen=True)
class LogRow:
    """One event as shown."""

    level: str
    step: int | None  # None: not a run's event (a replayed file's note)
    seconds: float  # since the run's first message
    run: str
    color: str
    text: str


@dataclass
class EventLog:
    """Rows (oldest first) drawn newest first in ``height`` lines: a table, or below
    :data:`STACK_BELOW` columns each event's text on the lines under its level, step, time
    and run (a table's event column would be a few characters wide there)."""

    rows: Sequence[LogRow]
    height: int = 20
    ascii: bool = False
    title: str = ""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        conv = asciify if self.ascii else str
        if self.title:
            yield Text(conv(self.title), style="bold", no_wrap=True, overflow=cut(self.ascii))
        if not self.rows:
            yield Text("no events", style="dim")
            return
        if options.max_width < STACK_BELOW:
            yield from self.stacked(console, options.max_width)
            return
        t = Table(
            box=None if self.ascii else box.SIMPLE_HEAD,
            header_style="bold underline" if self.ascii else "bold",
            pad_edge=False,
            expand=True,
        )
        t.add_column("level", no_wrap=True, max_width=7)
        t.add_column("step", justify="right", no_wrap=True)
        t.add_column("time", justify="right", no_wrap=True)
        narrow = options.max_width < 90  # the run's name cut short (apart from the others')
        run_w = NARROW_RUN if options.max_width >= 70 else NARROW_RUN - 2  # the event keeps room
        short = short_names([r.run for r in self.rows], run_w, self.ascii)
        if narrow:
            t.add_column("run", no_wrap=True, overflow=cut(self.ascii), max_width=run_w)
        else:
            t.add_column("run", no_wrap=True, overflow=cut(self.ascii), max_width=12)
        t.add_column("event", ratio=1, overflow="fold")  # long texts take two lines
        room = max(1, self.height - 3 - (1 if self.title else 0))
        for r in list(self.rows)[::-1][:room]:
            t.add_row(
                Text(r.level, style=LEVEL_STYLE.get(r.level, "")),
                "" if r.step is None else f"{r.step:,}",
                f"+{r.seconds:.0f}s" if r.seconds == r.seconds else "",
                Text(short.get(r.run, conv(r.run)), style=r.color)
                if narrow
                else Text(conv(r.run), style=r.color),
                conv(r.text),
            )
        yield t

    def stacked(self, console: Console, width: int) -> list[Text]:
        """Newest first, as many whole events as fit: ``warning 1,200 +4s ■ run`` and under it
        the text, indented and wrapped to the width."""
        conv = asciify if self.ascii else str
        room = max(1, self.height - (1 if self.title else 0))
        out: list[Text] = []
        for r in list(self.rows)[::-1]:
            head = Text.assemble(
                (r.level, LEVEL_STYLE.get(r.level, "")),
                ("" if r.step is None else f"  {r.step:,}", ""),
                (f"  +{r.seconds:.0f}s" if r.seconds == r.seconds else "", "dim"),
                ("  " + ("#" if self.ascii else "■") + " ", r.color),
                (conv(r.run), r.color),
                no_wrap=True,
                overflow=cut(self.ascii),
            )
            body = Text(conv(r.text), overflow="fold").wrap(console, max(1, width - 2))
            lines = [head, *(Text("  ") + line for line in body)]
            if out and len(out) + len(lines) > room:
                break
            out += lines
        return out[:room]
