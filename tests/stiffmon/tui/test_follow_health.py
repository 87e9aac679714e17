"""``stiffmon replay --follow`` of a run killed without a bye: the monitor says the writer is gone
(it used to show "replay" for ever)."""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
from pathlib import Path

from stiffmon import protocol as p
from stiffmon.session import SessionWriter
from stiffmon.tui.app import StiffmonApp
from stiffmon.tui.sources import ReplaySource
from tests.stiffmon.test_process_check import dead_pid
from tests.stiffmon.tui.fixtures import run_messages
from tests.stiffmon.tui.test_app import screen_text


def without_bye(tmp_path: Path, run: str, pid: int) -> Path:
    """A 60-step session of ``run`` written by process ``pid`` of this machine, without a bye."""
    msgs = run_messages(0.1, run, 0, steps=60)
    hello = msgs[0]
    assert isinstance(hello, p.Hello)
    msgs[0] = dataclasses.replace(hello, host=socket.gethostname(), pid=pid, t=time.time())
    path = tmp_path / f"{run}.stiff"
    with SessionWriter(path) as writer:
        for m in msgs:
            if m.KIND != "bye":
                writer.write(m)
    return path


async def test_a_followed_run_whose_writer_died_has_ended(tmp_path: Path) -> None:
    pid = dead_pid()
    path = without_bye(tmp_path, "killed", pid)
    src = ReplaySource([path], follow=True)
    src.load()
    app = StiffmonApp(replay=src, clock=lambda: 0.0)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.3)
        rd = app.store.runs["killed"]
        h = app.health(rd)
        said = [e.message for e in app.monitor_events.get("killed", [])]
        shown = screen_text(app)
    assert (h.state, h.text) == ("ended", f"no bye (writer pid {pid} gone)")
    assert any(f"writer pid {pid} gone" in text for text in said), said
    assert f"writer pid {pid} gone" in shown


async def test_a_replay_read_before_its_writer_finished_is_not_called_crashed(
    tmp_path: Path,
) -> None:
    """Without ``--follow``, a file whose writer still runs is not a crash: ``no bye yet``."""
    path = without_bye(tmp_path, "running", os.getpid())
    src = ReplaySource([path], follow=False, speed=math.inf)
    src.load()
    app = StiffmonApp(replay=src, clock=lambda: 0.0)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.5)
        h = app.health(app.store.runs["running"])
        shown = screen_text(app)
    assert (h.state, h.text) == ("replay", f"no bye yet (writer pid {os.getpid()} still running)")
    assert "no bye yet" in shown and "crashed" not in shown
