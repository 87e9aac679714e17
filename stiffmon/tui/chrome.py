"""The app's chrome as pure functions of its state: title and status lines, the run list rows,
the empty screen, the command palette's commands, and what changed in a run's health."""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import SystemCommand

from stiffmon.derive import OPTIMIZER_SKIPPED
from stiffmon.series import last_or
from stiffmon.store import MEASUREMENTS, Health, RunData
from stiffmon.tui.renderables.axes import asciify, cut, fmt_tick
from stiffmon.tui.renderables.runlist import RunRow
from stiffmon.tui.runlines import run_tag
from stiffmon.tui.views import VIEWS, run_color
from stiffmon.tui.views.base import SMOOTHING

if TYPE_CHECKING:
    from stiffmon.tui.app import StiffmonApp

REASON_WORDS = {"overhead": "cap", "overhead-cap": "cap", "budget": "cap", "disabled": "off"}


def title(app: StiffmonApp) -> Text:
    """``stiffmon  4 sharpness   log-y  x: step  zoom 100-300  cursor 250``."""
    flags = []
    if app.log_y:
        flags.append("log-y")
    if SMOOTHING[app.smooth_i]:
        flags.append(f"smoothing {SMOOTHING[app.smooth_i]:g}")
    flags.append("x: time" if app.x_time else "x: step")
    if app.x_window is not None:
        flags.append(f"zoom {fmt_tick(app.x_window[0])}-{fmt_tick(app.x_window[1])}")
    if app.cursor_x is not None:
        flags.append(f"cursor {app.cursor_x:g}")
    view = app.views[app.view_name]
    return Text.assemble(
        ("stiffmon", "bold"),
        (" ascii" if app.ascii else "", "dim"),
        ("  ", ""),
        (f"{view.key} {view.name}", "bold cyan"),
        ("   " + "  ".join(flags), "dim"),
        no_wrap=True,
        overflow=cut(app.ascii),
    )


def status(app: StiffmonApp) -> Text:
    """Where the data come from, errors, malformed frames."""
    parts = []
    done = all_done(app)
    if app.live is not None:
        word = "listening" if done else "live"
        parts.append(done + app.live.describe(word=word) + (" (paused)" if app.paused else ""))
        if app.live.error:
            parts.append(f"error: {app.live.error}")
        if app.live.reconnects:
            parts.append(f"reconnects {app.live.reconnects}")
    if app.replay is not None:
        parts.append(app.replay.describe())
        notes = app.replay.notes
        more = f"1 of {len(notes)} notes (g log): " if len(notes) > 1 else ""
        parts += [more + notes[0]] if notes else []
    parts.append(f"malformed {app.store.malformed}")
    sep = " | " if app.ascii else "  │  "
    text = sep.join(parts)
    if app.live is not None and len(text) > app.size.width - 2:  # the counters, not cut off
        short = app.live.describe(short=True, word=word) + (" (paused)" if app.paused else "")
        short = done + short
        text = sep.join([short, *parts[1:]])
    return Text(
        asciify(text) if app.ascii else text, style="dim", no_wrap=True, overflow=cut(app.ascii)
    )


DONE_STATES = ("finished", "ended", "lost")  # a run that will send nothing more


def all_done(app: StiffmonApp) -> str:
    """``all 24 runs over (20 finished, 4 ended); `` when no watched run is live any more
    (finished, ended by an error, or lost), to go before the source's words (which then read
    ``listening: …`` rather than ``live: …``: the monitor still takes new runs); ``""`` while
    a run is live, stalled or replayed, or before any."""
    if app.live is None or not app.store.runs:
        return ""
    now = app.clock()
    states = [app.health(rd, now).state for rd in app.store.runs.values()]
    if any(s not in DONE_STATES for s in states):
        return ""
    counts = ", ".join(f"{states.count(s)} {s}" for s in DONE_STATES if s in states)
    n = len(states)
    return f"{'the run is' if n == 1 else f'all {n} runs'} over ({counts}); "


def empty_message(app: StiffmonApp) -> Text:
    """What the screen says while the store has no run: a replay's position, or how to connect."""
    if app.replay is not None:
        files = ", ".join(f.name for f in app.replay.files)
        state = "playing" if app.replay.playing else "paused"
        return Text.assemble(
            (f"Replay at its start ({state}): no message replayed yet.\n\n", "bold"),
            (f"Files: {files}\n\n", ""),
            ("space: play   End: jump to the end   ← / →: previous / next measurement", "dim"),
        )
    where = (
        ", ".join(map(str, app.live.endpoints))
        if app.live and app.live.endpoints
        else "the local registry (no runs registered yet; new ones are picked up)"
    )
    return Text.assemble(
        ("Nothing connected yet.\n\n", "bold"),
        (f"Waiting for runs on: {where}\n\n", ""),
        ("In your training script:\n", "dim"),
        (
            "    from stiffmon_agent import Agent\n"
            "    agent = Agent(model, loss_fn, optimizer, probe=(x, y))\n"
            "    ...\n    agent.step(loss)\n\n",
            "cyan",
        ),
        (
            "Then: stiffmon watch  |  stiffmon watch tcp://host:5555  |  stiffmon watch ssh://user@host\n",
            "dim",
        ),
        ("Or try: stiffmon demo   /   stiffmon replay demos/sessions/*.stiff", "dim"),
    )


def when(rd: RunData, text: str, now: float | None = None) -> tuple[int, float]:
    """(step, time) a health change happened: a problem at the step its event gave, else now
    (``now``, monotonic) on the agent's clock: the latest agent time any message carried (a
    heartbeat's too: a hung loop's agent still sends them, and its stall is news now, not at its
    last step) plus how long it has been quiet since; a replayed run's last time."""
    at = rd.problem_at(text)
    if at is not None:
        return at
    if now is None or rd.replay:
        return rd.last_step, rd.last_t
    prog = rd.progress
    if math.isfinite(prog.agent_t):
        return rd.last_step, prog.agent_t + max(0.0, now - prog.seen)
    return rd.last_step, rd.last_t + max(0.0, now - rd.last_seen)


def short_problems(rd: RunData) -> list[str]:
    out = []
    if rd.diverged_step is not None:
        out.append(f"diverged @{rd.diverged_step:,}")
    out += [f"{m} disabled" for m in rd.disabled]
    return out


def coverage_lines(rd: RunData) -> list[str]:
    """``sharpness 3/9 (cap)`` for every kind with a skipped measurement, and ``optimizer
    skips: 12`` when training steps had no optimizer step (``GradScaler`` on inf/NaN grads)."""
    out = []
    skips = last_or(rd.series(OPTIMIZER_SKIPPED), 0.0)
    if skips > 0:
        out.append(f"optimizer skips: {int(skips):,}")
    for kind in MEASUREMENTS:
        done, skipped = rd.coverage(kind)
        if not skipped:
            continue
        reasons = rd.skip_reasons.get(kind, {})
        top = max(reasons, key=lambda r: reasons[r]) if reasons else ""
        why = f" ({REASON_WORDS.get(top, top)})" if top else ""
        out.append(f"{kind} {done}/{done + skipped}{why}")
    return out


def run_rows(app: StiffmonApp) -> list[RunRow]:
    now = app.clock()
    rows = []
    for i, rd in enumerate(app.store.runs.values()):
        h = app.health(rd, now)
        rows.append(
            RunRow(
                rd.name,
                run_color(rd),
                rd.visible,
                i == app.selected % max(1, len(app.store.runs)),
                h.state,
                h.text,
                h.level,
                rd.last_step,
                short_problems(rd),
                coverage_lines(rd),
                run_tag(rd),
            )
        )
    return rows


def changes(old: Health | None, new: Health) -> Iterator[tuple[str, str]]:
    """(level, words) for what is new in ``new``."""
    if old is None:
        yield "info", f"run appeared ({new.text})"
    elif old.state != new.state:
        level = {"stalled": "warning", "lost": "error", "ended": "error"}.get(new.state, "info")
        if new.state == "stalled":
            text = f"stalled: {new.why or 'no message for 3 s'}"
        elif old.state == "stalled" and new.state == "live":
            text = "live again"
        else:
            text = new.text
        yield level, text
    before = set(old.problems) if old is not None else set()
    for prob in new.problems:
        if prob not in before:
            yield ("error" if prob.startswith("diverged") else "warning"), prob


# said by the run's health (diverged, disabled) or its coverage markers (skips)
HEALTH_CODES = frozenset({"nan-loss", "metric-error", "metric-disabled", "measurement-skipped"})


def event_news(rd: RunData, seen: int, said: set[str]) -> tuple[int, list[tuple[str, str]]]:
    """The run's warning and error events after the first ``seen``, each code once per run
    (``said`` grows), but those its health already says: (events seen now, [(level, text)])."""
    total = rd.events_dropped + len(rd.events)
    fresh = rd.events[max(0, len(rd.events) - (total - seen)) :] if total > seen else []
    out = []
    for ev in fresh:
        if ev.level in ("warning", "error") and ev.code not in HEALTH_CODES | said:
            said.add(ev.code)
            out.append((ev.level, ev.message))
    return total, out


def commands(app: StiffmonApp) -> Iterator[SystemCommand]:
    """The app's own commands for the palette."""
    for v in VIEWS:
        yield SystemCommand(
            f"View: {v.title}",
            f"show the {v.title} view (key {v.key})",
            partial(app.action_view, v.name),
        )
    for i, rd in enumerate(app.store.runs.values()):
        yield SystemCommand(
            f"Run: select {rd.name}",
            "select it (stiffness, distance, layers, spectra views)",
            partial(_select, app, i),
        )
        yield SystemCommand(
            f"Run: {'hide' if rd.visible else 'show'} {rd.name}",
            "toggle it in the charts",
            partial(_toggle_run, app, rd),
        )
    for attr, label in (("log_y", "log-y axis"), ("x_time", "x axis: step / wall time")):
        yield SystemCommand(f"Toggle: {label}", label, partial(app.action_toggle, attr))
    yield SystemCommand("Toggle: smoothing", "cycle the EMA smoothing", app.action_smoothing)
    yield SystemCommand("Zoom: reset", "whole x range, no cursor", app.action_reset_zoom)
    yield SystemCommand("Screenshot (SVG)", "save the screen as SVG", app.action_screenshot)
    yield SystemCommand("Pause / play", "pause live ingest or play the replay", app.action_pause)


def _select(app: StiffmonApp, i: int) -> None:
    app.selected = i
    app.redraw(force=True)


def _toggle_run(app: StiffmonApp, rd: RunData) -> None:
    rd.visible = not rd.visible
    app.redraw(force=True)
