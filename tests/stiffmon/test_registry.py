"""The local registry of running agents."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from stiffmon.registry import RunEntry, list_runs, register, unregister
from tests.conftest import Procs, wait_for

NOW = time.time()  # this test process started before: an entry it could have written


def test_register_list_unregister(_registry: Path) -> None:
    e = RunEntry("r1", "a", "tcp://127.0.0.1:5555", os.getpid(), socket.gethostname(), time.time())
    register(e)
    assert list_runs() == [e]
    unregister("r1")
    assert list_runs() == []


def test_stale_and_corrupt_entries_are_ignored_and_removed(_registry: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    register(RunEntry("gone", "x", "tcp://127.0.0.1:6000", pid, socket.gethostname(), 1.0))
    (_registry / "junk.json").write_text("{not json")
    (_registry / "wrong.json").write_text(json.dumps({"run": 1}))
    alive = RunEntry("here", "y", "tcp://127.0.0.1:6002", os.getpid(), socket.gethostname(), NOW)
    register(alive)
    assert list_runs() == [alive]
    assert sorted(p.name for p in _registry.glob("*.json")) == ["here.json"]


def test_an_entry_being_written_is_neither_listed_nor_removed(_registry: Path) -> None:
    """register() writes a ``.tmp-`` file then renames it: a monitor scanning in between must
    leave it alone (it removed it as corrupt, and the agent's register failed)."""
    writing = _registry / ".tmp-abc123.json"
    writing.write_text("")  # mkstemp made it, json.dump has not written yet
    assert list_runs(_registry) == []
    assert writing.exists()


def test_entries_with_wrong_field_types_are_skipped_and_removed(_registry: Path) -> None:
    good = {
        "run": "ok",
        "name": "n",
        "endpoint": "tcp://127.0.0.1:6004",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": NOW,
    }
    bad = {
        "endpoint-int": {**good, "endpoint": 5},
        "endpoint-junk": {**good, "endpoint": "not an endpoint"},
        "pid-str": {**good, "pid": "1"},
        "pid-bool": {**good, "pid": True},
        "pid-huge": {**good, "pid": 2**70},
        "name-list": {**good, "name": ["a"]},
        "started-str": {**good, "started": "now"},
        "extra": {**good, "extra": 1},
        "list": [good],
    }
    for name, raw in bad.items():
        (_registry / f"{name}.json").write_text(json.dumps(raw))
    (_registry / "ok.json").write_text(json.dumps(good))
    assert [e.run for e in list_runs()] == ["ok"]
    assert [p.name for p in _registry.glob("*.json")] == ["ok.json"]


def test_watch_with_a_corrupt_registry_entry_still_resolves(_registry: Path) -> None:
    from stiffmon.sources import resolve

    entry = {
        "run": "r",
        "name": "n",
        "endpoint": {"host": "x"},
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": 1.0,
    }
    (_registry / "r.json").write_text(json.dumps(entry))
    assert resolve([]).endpoints == []


def test_an_entry_whose_pid_was_reused_is_stale(_registry: Path, procs: Procs) -> None:
    """The run ended without removing its entry (killed) and a later process got its pid: that
    process is not the run, and whatever now listens on the run's port is not its agent."""
    later = procs.start("-c", "import time; time.sleep(60)")
    here = socket.gethostname()
    an_hour_ago = time.time() - 3600
    register(RunEntry("old", "x", "tcp://127.0.0.1:6010", later.pid, here, an_hour_ago))
    mine = RunEntry("mine", "y", "tcp://127.0.0.1:6012", later.pid, here, time.time())
    register(mine)  # the same pid, registered after that process started: its run
    assert list_runs() == [mine]
    assert sorted(p.name for p in _registry.glob("*.json")) == ["mine.json"]


def test_watch_skips_ended_runs(_registry: Path, procs: Procs) -> None:
    """``stiffmon watch`` with no endpoint: neither a dead pid's nor a reused pid's port."""
    from stiffmon.sources import resolve

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)  # fmt: skip
    later = procs.start("-c", "import time; time.sleep(60)")
    here = socket.gethostname()
    register(RunEntry("dead", "x", "tcp://127.0.0.1:6020", int(dead.stdout), here, NOW))
    register(RunEntry("reused", "x", "tcp://127.0.0.1:6022", later.pid, here, NOW - 3600))
    register(RunEntry("live", "y", "tcp://127.0.0.1:6024", os.getpid(), here, NOW))
    assert [str(e) for e in resolve([]).endpoints] == ["tcp://127.0.0.1:6024"]


def test_entries_of_other_hosts_are_kept(_registry: Path) -> None:
    """A registry shared between machines (a network home): their pids cannot be checked here."""
    e = RunEntry("far", "x", "tcp://gpu-box:6030", 1, "not-" + socket.gethostname(), 5.0)
    register(e)
    assert list_runs() == [e]


def test_an_entry_whose_process_exited_unreaped_is_stale(_registry: Path) -> None:
    """A killed agent whose parent has not reaped it yet (a zombie): its pid still exists, but
    its sockets are closed and its port free for any other process to take."""
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        stat = Path(f"/proc/{zombie.pid}/stat")
        assert wait_for(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")
        here = socket.gethostname()
        register(RunEntry("z", "x", "tcp://127.0.0.1:6040", zombie.pid, here, time.time()))
        assert list_runs() == []
        assert not (_registry / "z.json").exists()
    finally:
        zombie.wait()
