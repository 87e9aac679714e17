"""``replay --follow`` of a run whose writer was killed: told by the hello's host and pid."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time

from stiffmon import protocol as p
from stiffmon.process_check import writer_state
from stiffmon.store import Store

HOST = socket.gethostname()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(30)
    return child.pid


def test_a_writer_is_alive_gone_or_unknown() -> None:
    me = os.getpid()
    assert writer_state(HOST, me, time.time()) == "alive"
    assert writer_state(HOST, dead_pid(), time.time()) == "gone"
    assert writer_state("another-box", me, time.time()) == "unknown"
    assert writer_state(HOST, 0, time.time()) == "unknown"
    assert writer_state("", me, time.time()) == "unknown"


def test_a_reused_pid_is_not_the_writer() -> None:
    """The pid runs, but a process started long after the run's hello holds it now."""
    assert writer_state(HOST, os.getpid(), time.time() - 10 * 86_400) == "gone"


def _followed(pid: int) -> Store:
    st = Store()
    hello = p.Hello(run="r", seq=0, step=0, t=time.time(), name="r", host=HOST, pid=pid)
    st.apply(hello, replay=True, now=100.0)
    st.apply(
        p.Scalars.from_dict({"loss": 1.0}, run="r", seq=1, step=5, t=1.0), replay=True, now=100.0
    )
    return st


def test_a_followed_run_in_words() -> None:
    rd = _followed(4321).runs["r"]
    h = rd.health(now=101.0, writer="gone")
    assert (h.state, h.text, h.level) == ("ended", "no bye (writer pid 4321 gone)", "error")
    h = rd.health(now=102.0, writer="alive")
    assert (h.state, h.text, h.level) == ("replay", "replay", "ok")  # quiet for 2 s: a slow step
    h = rd.health(now=130.0, writer="alive")
    assert (h.state, h.text, h.level) == (
        "stalled",
        "no new record for 30s; writer alive",
        "warning",
    )
    h = rd.health(now=130.0, writer="unknown")
    assert h.text == "no new record for 30s" and h.why == "the file has not grown for 30s"
    assert rd.health(now=130.0).text == "replay"  # not followed: the file is what it is
    done = dataclasses.replace(rd, finished=True, bye_reason="closed")
    assert done.health(now=130.0, writer="gone").state == "finished"


def test_the_watch_asks_once_a_second_per_writer() -> None:
    from stiffmon.process_check import WriterWatch

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        watch, t = WriterWatch(every=0.3), time.time()
        assert watch.state(HOST, child.pid, t) == "alive"
        child.kill()
        child.wait(30)
        assert watch.state(HOST, child.pid, t) == "alive"  # the answer of < 0.3 s ago
        time.sleep(0.35)
        assert watch.state(HOST, child.pid, t) == "gone"
    finally:
        child.kill()
