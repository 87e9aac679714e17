"""Whether the process that wrote a run still runs (for ``replay --follow``).

A followed session file says nothing when its writer is killed (no bye is written), and nothing
either while a slow training step runs. On the writer's own machine the two can be told apart:
the run's hello names its host and pid. A pid that now belongs to a process started after the
run's hello was reused: the writer is gone.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Literal

WriterState = Literal["alive", "gone", "unknown"]
START_SLACK = 2.0  # seconds a process's start time may lie after its own hello (clock ticks)


def _started(pid: int) -> float | None:
    """The Unix time process ``pid`` started (Linux ``/proc``; None elsewhere or on error)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22: starttime
        btime = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def writer_state(host: str, pid: int, hello_t: float) -> WriterState:
    """``alive``, ``gone`` or ``unknown`` (another machine, no pid) for the writer that said
    hello at Unix time ``hello_t`` from ``host`` as process ``pid``."""
    if pid <= 0 or not host or host != socket.gethostname():
        return "unknown"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        pass  # another user's process: it exists
    except OSError:
        return "unknown"
    started = _started(pid)
    if started is not None and started > hello_t + START_SLACK:
        return "gone"  # the pid was given to a later process
    return "alive"


class WriterWatch:
    """:func:`writer_state` at most once every ``every`` seconds per writer (the monitor asks at
    every redraw, for every run).

    Args:
        every: Seconds an answer is kept.
    """

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self._seen: dict[tuple[str, int, float], tuple[float, WriterState]] = {}

    def state(self, host: str, pid: int, hello_t: float) -> WriterState:
        """:func:`writer_state`, or its answer of less than ``every`` seconds ago."""
        now = time.monotonic()
        key = (host, pid, hello_t)
        seen = self._seen.get(key)
        if seen is None or now - seen[0] >= self.every:
            seen = self._seen[key] = (now, writer_state(host, pid, hello_t))
        return seen[1]
