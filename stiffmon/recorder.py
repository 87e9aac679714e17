"""``stiffmon record``: subscribe to live runs and append them to a ``.stiff`` file, headless.

A write the OS refuses (disk full, quota, a file system gone read-only) does not end the
recording: the messages received meanwhile are held in memory (up to :data:`HOLD_BYTES`, the
oldest dropped beyond that and counted), the write is tried again every :data:`RETRY_SECONDS`,
and stderr says when writing stopped and when it resumed (with what was held and lost). The file
stays readable up to its last whole record throughout (:class:`~stiffmon.session.SessionWriter`
leaves no torn record). What is still held when the recording ends, or a file deleted while being
written, ends it with an ``OSError`` naming the file and the count of messages not written.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence

from stiffmon import protocol as p
from stiffmon.client import Client
from stiffmon.session import SessionError, SessionWriter
from stiffmon.transport import CurveKeys, Endpoint

HOLD_BYTES = 256 << 20
"""Bytes of received messages held in memory while the file refuses writes."""

RETRY_SECONDS = 1.0
"""Seconds between tries to write again while the file refuses writes."""


def _say(text: str) -> None:
    print(f"stiffmon record: {text}", file=sys.stderr, flush=True)


class _HeldWriter:
    """A :class:`SessionWriter` that holds what the OS refused and writes it when it can."""

    def __init__(self, writer: SessionWriter, say: Callable[[str], None]) -> None:
        self.writer = writer
        self.say = say
        self.held: deque[list[bytes]] = deque()
        self.held_bytes = 0
        self.lost = 0  # held messages dropped beyond HOLD_BYTES
        self.error: OSError | None = None  # why writing stopped (None: writing)
        self.next_try = 0.0

    def write(self, frames: list[bytes]) -> None:
        self.held.append(frames)
        self.held_bytes += sum(len(f) for f in frames)
        while self.held_bytes > HOLD_BYTES and len(self.held) > 1:
            self.held_bytes -= sum(len(f) for f in self.held.popleft())
            self.lost += 1
        self.drain()

    def drain(self, *, force: bool = False) -> None:
        if self.error is not None and not force and time.monotonic() < self.next_try:
            return
        while self.held:
            try:
                self.writer.write_frames(self.held[0])
            except SessionError as exc:  # deleted while open: nothing more can be kept
                raise OSError(errno.ENOENT, str(exc), str(self.writer.path)) from exc
            except OSError as exc:
                if self.error is None:
                    self.say(
                        f"cannot write {self.writer.path}: {exc.strerror or exc}; holding "
                        f"what arrives in memory (up to {HOLD_BYTES >> 20} MiB) and trying "
                        f"again every {RETRY_SECONDS:g} s (the file is whole up to here)"
                    )
                self.error = exc
                self.next_try = time.monotonic() + RETRY_SECONDS
                return
            self.held_bytes -= sum(len(f) for f in self.held.popleft())
        if self.error is not None:
            self.error = None
            lost = f", {self.lost} dropped (beyond {HOLD_BYTES >> 20} MiB)" if self.lost else ""
            self.say(f"writing {self.writer.path} again: the messages held were written{lost}")

    def finish(self) -> None:
        """Write what is held; raise ``OSError`` (naming the file) if that fails or some was
        dropped."""
        self.drain(force=True)
        if self.held or self.lost:
            err = self.error
            raise OSError(
                err.errno if err is not None else errno.ENOSPC,
                f"{err.strerror if err is not None else 'could not write'}: "
                f"{len(self.held) + self.lost} message(s) received were not written (the file "
                "holds every message before them)",
                str(self.writer.path),
            )


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
    The client's warnings (an ssh tunnel that exited or came back, a connection made again) are
    said on stderr as they come.

    Returns:
        (messages written, run ids seen, malformed frames dropped).
    """
    written = 0
    runs: set[str] = set()
    finished: set[str] = set()
    deadline = None if duration is None else time.monotonic() + duration
    with Client(endpoints, curve=curve) as client, SessionWriter(output, fsync=fsync) as file:  # type: ignore[arg-type]
        writer = _HeldWriter(file, _say)

        def write(received: list[tuple[p.AnyMessage, list[bytes]]]) -> None:
            nonlocal written
            for msg, frames in received:
                if msg.KIND == "heartbeat":
                    continue
                writer.write(frames)
                written += 1
                runs.add(msg.run)
                if msg.KIND == "bye":
                    finished.add(msg.run)
                if on_message is not None:
                    on_message(written, len(runs))

        try:
            while not stop() and (deadline is None or time.monotonic() < deadline):
                write(client.poll(0.1))
                for text in client.take_warnings():  # ssh exited / up again, connections remade
                    _say(text)
                writer.drain()
                if until_bye and runs and finished >= runs:
                    break
        finally:  # stopping (Ctrl+C too) loses nothing that already arrived
            write(client.flush_pending())
            writer.finish()
        return written - len(writer.held) - writer.lost, runs, client.stats.malformed
