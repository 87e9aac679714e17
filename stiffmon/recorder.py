"""``stiffmon record``: subscribe to live runs and append them to a ``.stiff`` file, headless."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

from stiffmon import protocol as p
from stiffmon.client import Client
from stiffmon.session import SessionWriter
from stiffmon.transport import CurveKeys, Endpoint


def record(
    endpoints: Sequence[str | Endpoint],
    output: str | os.PathLike[str],
    *,
    stop: Callable[[], bool] = lambda: False,
    duration: float | None = None,
    until_bye: bool = False,
    curve: CurveKeys | None = None,
    fsync: str | float = 1.0,
    on_message: Callable[[int, int], None] | None = None,
) -> tuple[int, set[str], int]:
    """Record until ``stop()``, ``duration`` seconds, or (``until_bye``) every run said bye.

    Agents that restart appear as new runs in the same file. Heartbeats are not recorded.

    Returns:
        (messages written, run ids seen, malformed frames dropped).
    """
    written = 0
    runs: set[str] = set()
    finished: set[str] = set()
    deadline = None if duration is None else time.monotonic() + duration
    with Client(endpoints, curve=curve) as client, SessionWriter(output, fsync=fsync) as writer:  # type: ignore[arg-type]

        def write(received: list[tuple[p.AnyMessage, list[bytes]]]) -> None:
            nonlocal written
            for msg, frames in received:
                if msg.KIND == "heartbeat":
                    continue
                writer.write_frames(frames)
                written += 1
                runs.add(msg.run)
                if msg.KIND == "bye":
                    finished.add(msg.run)
                if on_message is not None:
                    on_message(written, len(runs))

        try:
            while not stop() and (deadline is None or time.monotonic() < deadline):
                write(client.poll(0.1))
                if until_bye and runs and finished >= runs:
                    break
        finally:  # stopping (Ctrl+C too) loses nothing that already arrived
            write(client.flush_pending())
        return written, runs, client.stats.malformed
