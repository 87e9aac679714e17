"""Local registry of running agents, so ``stiffmon watch`` with no argument finds them.

Each agent writes one small JSON file ``<run_id>.json`` under :func:`registry_dir` while it runs
and removes it on exit. Entries whose process is gone or exited (a crashed or killed agent), or
whose pid now belongs to a later process (a reused pid: :func:`stale`), are stale, and entries
that are not well-formed (a field missing or of the wrong type, an unusable endpoint) are
corrupt: :func:`list_runs` skips and deletes both.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from stiffmon.process_check import writer_state


def registry_dir() -> Path:
    """``$STIFFMON_REGISTRY`` or ``$XDG_CACHE_HOME/stiffmon/runs`` (default ``~/.cache``)."""
    env = os.environ.get("STIFFMON_REGISTRY")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "stiffmon" / "runs"


@dataclass(frozen=True)
class RunEntry:
    """One running agent.

    Attributes:
        run: Run id.
        name: Display name.
        endpoint: ``tcp://host:port`` of its update stream.
        pid: Process id.
        host: Host name.
        started: Unix time the agent started.
    """

    run: str
    name: str
    endpoint: str
    pid: int
    host: str
    started: float


def _entry(raw: object) -> RunEntry:
    """A :class:`RunEntry` from parsed JSON, every field type-checked.

    Raises:
        ValueError: A missing or extra field, a field of the wrong type, or a bad endpoint.
    """
    from stiffmon.transport import parse_endpoint

    if not isinstance(raw, dict) or set(raw) != set(RunEntry.__dataclass_fields__):
        raise ValueError("not a registry entry")
    for key in ("run", "name", "endpoint", "host"):
        if not isinstance(raw[key], str):
            raise ValueError(f"{key} is not a string")
    pid, started = raw["pid"], raw["started"]
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 1 << 32:
        raise ValueError(f"bad pid {pid!r}")
    if not isinstance(started, int | float) or isinstance(started, bool):
        raise ValueError(f"bad start time {started!r}")
    if not math.isfinite(started):
        raise ValueError(f"bad start time {started!r}")
    parse_endpoint(raw["endpoint"])
    return RunEntry(**raw)


# Seconds a process may seem to have started after its own entry: process_check's own slack
# (clock ticks) plus a margin for the wall clock being stepped since, so that a live run's entry
# is never taken for stale (and deleted). A pid reused by a later process is caught once that
# process started more than this after the ended run registered.
REUSE_SLACK = 30.0


def _zombie(pid: int) -> bool:
    """Whether process ``pid`` has exited and waits for its parent to reap it (Linux ``/proc``:
    state ``Z``; False elsewhere or on error)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] == "Z"


def stale(entry: RunEntry) -> bool:
    """Whether ``entry``'s run has ended: its process is gone or has exited (a zombie its parent
    has not reaped yet: its sockets are closed), or its pid now belongs to a process started
    after the entry was written (the pid was reused; whatever listens on the run's port now is
    not its agent). Entries of other hosts cannot be checked: never stale."""
    state = writer_state(entry.host, entry.pid, entry.started + REUSE_SLACK)
    return state == "gone" or (state == "alive" and _zombie(entry.pid))


def register(entry: RunEntry, directory: Path | None = None) -> Path:
    """Write ``entry`` atomically; return the file's path."""
    d = directory or registry_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{entry.run}.json"
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(entry), f)
    os.replace(tmp, path)
    return path


def unregister(run: str, directory: Path | None = None) -> None:
    """Remove a run's entry if it is there."""
    with contextlib.suppress(FileNotFoundError):
        ((directory or registry_dir()) / f"{run}.json").unlink()


def list_runs(directory: Path | None = None) -> list[RunEntry]:
    """Live local runs, oldest first; stale (:func:`stale`) and unreadable entries are skipped
    and removed."""
    d = directory or registry_dir()
    out: list[RunEntry] = []
    if not d.is_dir():
        return out
    for path in d.glob("*.json"):
        if path.name.startswith("."):  # a register() still writing it (its .tmp- file)
            continue
        try:
            entry = _entry(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, RecursionError):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        if stale(entry):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        out.append(entry)
    return sorted(out, key=lambda e: e.started)
