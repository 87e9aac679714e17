"""The publisher thread's way out for one message: encode, number, publish, record, keep.

:class:`Emitter` is a base of :class:`~stiffmon_agent.publisher.Publisher` (which sets the
attributes declared here) and holds the thread's per-message path:

* ``_emit``: encode and number a message (only one that could be encoded, so ``seq`` never
  skips), send it on PUB without blocking, append it to the session file and the history, count
  what reaches neither in ``dropped``, and check its losses;
* ``_heartbeat``: a heartbeat (recorded only when asked: ``dropped`` grew, or just before bye);
* ``_say_problems``, ``_check_finite``, ``_warning``: the thread's own warning events (values of
  a batch that failed, a run of non-finite losses).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from stiffmon import protocol as p
from stiffmon.session import SessionWriter
from stiffmon_agent.accuracy_reasons import nan_accuracy_console, nan_accuracy_event
from stiffmon_agent.history import History
from stiffmon_agent.outgoing import Outgoing, build_message

RECORD_RETRY_SECONDS = 1.0
"""Seconds between tries to write the session file again after the OS refused a record."""


class Emitter:
    """The per-message path of the publisher thread; ``Publisher`` sets the attributes below."""

    run: str
    seq: int  # the last sequence number used
    dropped: int  # messages that reached neither the socket nor the file
    unrecorded: int  # messages not written because recording stopped
    published: int
    _last_step: int  # highest step seen, for heartbeats
    measuring: str = ""  # the measurement the training loop is in, for heartbeats
    _recorded_dropped: int  # ``dropped`` in the last heartbeat written to the file
    _record: Path | None
    _history: History
    _warn: Callable[[str], None]
    _nonfinite_streak: int
    _problems: set[str]  # why a batch's values failed (build_columns)
    _problems_said: set[str]
    sinks: list[Callable[[p.Message], None]]  # each published message but heartbeats
    _paused: OSError | None = None  # why the file refuses records (None: recording)
    _paused_lost: int = 0  # messages not written since
    _lost_steps: tuple[int, int] | None = None  # first and last step of per-step rows not written
    _retry_at: float = 0.0
    _accuracy_seen: bool = False  # some step's accuracy was a number (for the wording)
    _first_accuracy_step: int | None = None  # the first step with an accuracy (the wording)

    def _heartbeat(
        self, pub: zmq.Socket[bytes] | None, writer: SessionWriter | None, *, record: bool
    ) -> SessionWriter | None:
        hb = Outgoing(
            p.Heartbeat,
            self._last_step,
            time.time(),
            {"last_seq": max(self.seq, 0), "dropped": self.dropped, "measuring": self.measuring},
        )
        if not record:
            self._emit(hb, pub, None)
            return writer
        self._recorded_dropped = self.dropped
        return self._emit(hb, pub, writer)

    def _emit(
        self, item: Outgoing, pub: zmq.Socket[bytes] | None, writer: SessionWriter | None
    ) -> SessionWriter | None:
        if item.cls is p.Bye:  # the file's last word on losses, just before the bye
            self._retry_at = 0.0  # a paused recording tries once more before it is closed
            writer = self._heartbeat(pub, writer, record=True)
        try:
            msg = build_message(item, self.run, self.seq + 1, self._problems)
            frames = p.encode(msg)
        except Exception as exc:  # the seq is not used up: clients see no gap
            self.dropped += 1
            name = item.fields.get("name")
            what = f"{item.cls.KIND} {name!r}" if isinstance(name, str) else item.cls.KIND
            text = f"dropped a {what} message of step {item.step} that cannot be encoded: {exc}"
            self._warn(f"stiffmon: {text}")
            if item.cls is not p.Event:  # on screen and in the file, not only in the log
                attrs = {"kind": item.cls.KIND, "name": name if isinstance(name, str) else ""}
                code = "message-dropped"
                writer = self._warning(item.step, code, text[:2000], attrs, pub, writer)
            return writer
        self.seq = msg.seq
        self._last_step = max(self._last_step, item.step)
        sent = False
        if pub is not None:
            try:
                pub.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                sent = True
            except zmq.ZMQError:
                pass
        self.published += 1
        if msg.KIND != "heartbeat":
            self._history.add(msg, frames)
            for sink in list(self.sinks):
                try:
                    sink(msg)
                except Exception as exc:  # a sink never stops publishing: it is dropped
                    self.sinks.remove(sink)
                    self._warn(f"stiffmon: a message sink failed and is removed: {exc!r}")
        if writer is not None:  # heartbeats only come with a writer when they are recorded
            writer = self._write(writer, frames, msg, sent, pub)
        elif self._record is not None and msg.KIND != "heartbeat":
            self._unwritten(sent, msg)
        if not self._accuracy_seen and isinstance(msg, p.Columns) and "accuracy" in msg.names:
            if self._first_accuracy_step is None:
                self._first_accuracy_step = int(msg.steps[0])
            self._accuracy_seen = bool(np.isfinite(msg.column("accuracy")).any())
        if self._problems:
            writer = self._say_problems(msg.step, pub, writer)
        if isinstance(msg, p.Scalars):
            loss = msg.as_dict().get("loss")
            if loss is not None:
                writer = self._check_finite([msg.step], [loss], pub, writer)
        elif isinstance(msg, p.Columns) and "loss" in msg.names:
            losses = msg.column("loss")
            if not self._nonfinite_streak and bool(np.isfinite(losses).all()):
                return writer  # the common case, vectorised
            writer = self._check_finite(msg.steps.tolist(), losses.tolist(), pub, writer)
        return writer

    def _write(
        self,
        writer: SessionWriter,
        frames: list[Any],
        msg: p.Message,
        sent: bool,
        pub: zmq.Socket[bytes] | None,
    ) -> SessionWriter | None:
        """Append ``frames`` to the file; the writer still recording (None: stopped for good).

        A record the OS refuses (disk full, quota, read-only) pauses the recording: a
        ``recording-paused`` warning event goes to the monitor at once, the file stays whole up
        to its last record, and the write is tried again every :data:`RECORD_RETRY_SECONDS`
        (and before the ``bye``); the first that succeeds is preceded in the file by a
        ``recording-resumed`` event naming how many messages and which steps' per-step values
        were not written. Any other failure (the file deleted) stops the recording.
        """
        if self._paused is not None and time.monotonic() < self._retry_at:
            self._unwritten(sent, msg)
            return writer
        try:
            writer.write_frames(frames)
        except OSError as exc:
            self._retry_at = time.monotonic() + RECORD_RETRY_SECONDS
            first_failure = self._paused is None
            if first_failure:
                self._paused, self._paused_lost, self._lost_steps = exc, 0, None
            self._unwritten(sent, msg)
            if first_failure:
                text = (
                    f"recording to {self._record} paused at step {msg.step}: "
                    f"{exc.strerror or exc}; the file is whole up to here and is tried again "
                    f"every {RECORD_RETRY_SECONDS:g} s (training goes on)"
                )
                self._warn(f"stiffmon: {text}")
                attrs = {"error": str(exc), "step": msg.step}
                self._warning(msg.step, "recording-paused", text, attrs, pub, None)
            return writer
        except Exception as exc:
            self._warn(f"stiffmon: recording stopped: {exc}")
            with contextlib.suppress(Exception):
                writer.close()
            self._unwritten(sent, msg)
            return None
        if self._paused is not None:
            why, lost, rows = self._paused, self._paused_lost, self._lost_steps
            self._paused = None
            attrs: dict[str, Any] = {"lost": lost}
            what = ""
            if rows is not None:
                attrs |= {"first_step": rows[0], "last_step": rows[1]}
                what = f"; the per-step values of steps {rows[0]} to {rows[1]} are missing from it"
            text = (
                f"recording resumed at step {msg.step}: {lost} message(s) were not written to "
                f"the file ({why.strerror or why}){what}"
            )
            self._warn(f"stiffmon: {text}")
            writer = self._warning(msg.step, "recording-resumed", text, attrs, pub, writer)
        return writer

    def _unwritten(self, sent: bool, msg: p.Message) -> None:
        """Count ``msg`` as not recorded (and as dropped if it was not ``sent`` either)."""
        self.unrecorded += 1
        if not sent:
            self.dropped += 1
        if self._paused is None:
            return
        self._paused_lost += 1
        if isinstance(msg, p.Columns) and len(msg.steps):
            a, b = int(msg.steps[0]), int(msg.steps[-1])
            old = self._lost_steps
            self._lost_steps = (a, b) if old is None else (min(old[0], a), max(old[1], b))

    def _say_problems(
        self, step: int, pub: zmq.Socket[bytes] | None, writer: SessionWriter | None
    ) -> SessionWriter | None:
        """One warning ``event`` (and log line) per new reason a batch's values failed; the
        writer still recording (None once a write failed).

        The accuracy is said to be unavailable for the run while no step's accuracy has been a
        number yet (a regression, probability targets: every step NaN), and NaN at some steps
        once one has.
        """
        new = sorted(self._problems - self._problems_said)[: max(0, 20 - len(self._problems_said))]
        self._problems.clear()
        for text in new:
            self._problems_said.add(text)
            seen, first = self._accuracy_seen, self._first_accuracy_step
            self._warn(nan_accuracy_console(text, seen=seen))
            what = nan_accuracy_event(text, step, seen=seen, first_step=first)
            writer = self._warning(step, "accuracy-unavailable", what, {}, pub, writer)
        return writer

    def _check_finite(
        self,
        steps: list[int],
        losses: list[float],
        pub: zmq.Socket[bytes] | None,
        writer: SessionWriter | None,
    ) -> SessionWriter | None:
        """One ``nan-loss`` event at the start of every run of non-finite losses; the writer
        still recording."""
        for step, loss in zip(steps, losses, strict=True):
            if math.isfinite(loss):
                self._nonfinite_streak = 0
                continue
            self._nonfinite_streak += 1
            if self._nonfinite_streak != 1:
                continue
            self._warn(f"stiffmon: non-finite loss ({loss}) at step {step}; training goes on")
            text = f"loss is {loss} at step {step}"
            writer = self._warning(step, "nan-loss", text, {}, pub, writer)
        return writer

    def _warning(
        self,
        step: int,
        code: str,
        message: str,
        attrs: dict[str, Any],
        pub: zmq.Socket[bytes] | None,
        writer: SessionWriter | None,
    ) -> SessionWriter | None:
        """Publish (and record) a warning ``event`` of the thread's own; the writer still
        recording."""
        fields = {"level": "warning", "code": code, "message": message, "attrs": attrs}
        return self._emit(Outgoing(p.Event, step, time.time(), fields), pub, writer)
