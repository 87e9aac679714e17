"""The local registry of running agents."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from stiffmon.registry import RunEntry, list_runs, register, unregister


def test_register_list_unregister(_registry: Path) -> None:
    e = RunEntry("r1", "a", "tcp://127.0.0.1:5555", os.getpid(), socket.gethostname(), 1.0)
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
    alive = RunEntry("here", "y", "tcp://127.0.0.1:6002", os.getpid(), socket.gethostname(), 2.0)
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
        "started": 3.0,
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
