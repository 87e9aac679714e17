"""Log: every event of every run (the agent's and the monitor's own: stalls, new runs), newest
first; ``f`` cycles the level filter, ``/`` filters by text, ``r`` shows the selected run only."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.console import RenderableType
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import Input

from stiffmon import protocol as p
from stiffmon.tui.renderables.eventlog import EventLog, LogRow
from stiffmon.tui.views.base import ChartView, View, run_color

LEVELS = ("info", "warning", "error")


def wall_time(t: float, first_t: float) -> float:
    """The sort key of an event made at Unix time ``t`` in a run that started at ``first_t``:
    ``t`` itself; an event without a finite time sorts at its run's start (before every other
    event when that is unknown too)."""
    if math.isfinite(t):
        return t
    return first_t if math.isfinite(first_t) else -math.inf


def said_by_agent(ev: p.Event, agent_events: Sequence[p.Event]) -> bool:
    """Whether ``ev`` is the monitor's own ``finished`` line for a run whose agent logged a
    ``finished`` event of its own (``stiffmon demo``'s runs do, with the validation accuracy):
    one line says it, not two."""
    return (
        ev.code == "monitor"
        and ev.message == "finished"
        and any(a.code == "finished" for a in agent_events)
    )


def event_text(ev: p.Event, run_name: str) -> str:
    """``code: message``, the message without a leading ``<run name>: `` (the run column
    names the run)."""
    msg = ev.message.removeprefix(f"{run_name}: ") if run_name else ev.message
    return msg if ev.code in ("", "monitor") else f"{ev.code}: {msg}"


class Log(View):
    name = "log"
    key = "g"
    title = "log"
    zoomable = False

    def widget(self) -> Widget:
        return Vertical(
            Input(placeholder="filter text (press / to type, enter to return)", id="log-filter"),
            ChartView(self.build, id="log-table"),
            id=self.name,
        )

    def rows(self) -> list[LogRow]:
        """Every event that passes the filters, oldest first by wall-clock time across runs
        (each row's time is since its own run's start: runs started apart would interleave
        wrongly by it); events at the same time keep their order (run, then arrival)."""
        app = self.app
        floor = LEVELS.index(app.log_level) if app.log_level in LEVELS else 0
        needle = app.log_text.lower()
        sel = self.selected_run() if app.log_selected_only else None
        out: list[tuple[float, LogRow]] = []
        for rd in app.store.runs.values():
            if sel is not None and rd is not sel:
                continue
            events = [*rd.events, *app.monitor_events.get(rd.run, ())]
            for ev in events:
                if said_by_agent(ev, rd.events):
                    continue
                lvl = ev.level if ev.level in LEVELS else "info"
                if LEVELS.index(lvl) < floor:
                    continue
                text = event_text(ev, rd.name)
                if needle and needle not in text.lower() and needle not in rd.name.lower():
                    continue
                secs = ev.t - rd.first_t if math.isfinite(rd.first_t) else math.nan
                row = LogRow(lvl, ev.step, secs, rd.name, run_color(rd), text)
                out.append((wall_time(ev.t, rd.first_t), row))
        out.sort(key=lambda kr: kr[0])  # stable: ties keep their order
        if app.replay is not None and sel is None:  # files left out or damaged: newest, on top
            for note in reversed(app.replay.notes):  # drawn newest (last) first
                if LEVELS.index("warning") >= floor and (not needle or needle in note.lower()):
                    out.append((math.inf, LogRow("warning", None, math.nan, "replay", "", note)))
        return [row for _, row in out]

    def build(self, width: int, height: int) -> RenderableType:
        app = self.app
        sel = self.selected_run()
        scope = f"run {sel.name}" if app.log_selected_only and sel is not None else "all runs"
        title = (
            f"events: {scope}, level ≥ {app.log_level}"
            + (f", text '{app.log_text}'" if app.log_text else "")
            + "  (keys f, r, /)"
        )
        return EventLog(self.rows(), height=height, ascii=app.ascii, title=title)
