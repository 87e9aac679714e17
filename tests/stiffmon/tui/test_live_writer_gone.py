"""A live run on this machine that goes quiet because its process died (SIGKILL, OOM killer)
reads as ended, in the words a replay uses (``no bye (writer pid N gone)``), not as a connection
problem; one whose process still runs stays stalled or disconnected."""

from __future__ import annotations

import os
import socket
import time

from stiffmon import protocol as p
from stiffmon.run_data import STALL_SECONDS
from stiffmon.store import Store
from stiffmon.tui.app import StiffmonApp
from tests.stiffmon.test_process_check import dead_pid


def _live_run(pid: int, host: str, cut_off: str = "") -> tuple[StiffmonApp, Store]:
    st, t = Store(), time.time()  # the hello after the process started: its pid not reused
    st.apply(p.Hello(run="r", seq=0, step=0, t=t, name="sgd", host=host, pid=pid), now=0.0)
    st.apply(p.Scalars.from_dict({"loss": 1.0}, run="r", seq=1, step=0, t=t), now=0.0)
    st.runs["r"].cut_off = cut_off
    return StiffmonApp(store=st, clock=lambda: 0.0), st


def test_a_quiet_live_run_whose_process_is_gone_has_ended() -> None:
    pid = dead_pid()
    app, st = _live_run(pid, socket.gethostname(), cut_off="tcp://127.0.0.1:5555")
    rd = st.runs["r"]
    assert app.health(rd, rd.last_seen + 1.0).state == "live"  # not asked while messages come
    h = app.health(rd, rd.last_seen + STALL_SECONDS + 2.0)
    assert (h.state, h.text, h.level) == ("ended", f"no bye (writer pid {pid} gone)", "error")


def test_a_quiet_live_run_whose_process_runs_is_only_disconnected() -> None:
    app, st = _live_run(os.getpid(), socket.gethostname(), cut_off="tcp://127.0.0.1:5555")
    rd = st.runs["r"]
    h = app.health(rd, rd.last_seen + STALL_SECONDS + 2.0)
    assert (h.state, h.text) == ("stalled", "disconnected 5s (tcp://127.0.0.1:5555)")


def test_another_machines_quiet_run_is_not_judged() -> None:
    """A dead pid on another host says nothing about that host's process."""
    app, st = _live_run(dead_pid(), "elsewhere.example")
    rd = st.runs["r"]
    h = app.health(rd, rd.last_seen + STALL_SECONDS + 2.0)
    assert (h.state, h.text) == ("stalled", "stalled 5s")
