"""The agent's background thread: it owns the sockets, the history and the session file.

The training thread only calls :meth:`Publisher.submit`, which never blocks: a full queue drops
the item and counts it. The thread encodes, assigns sequence numbers (only to messages that could
be encoded, so ``seq`` never skips), publishes on PUB, appends to the ``.stiff`` file, keeps the
history and answers snapshot requests on ROUTER (DESIGN §4) through a
:class:`~stiffmon_agent.snapshots.SnapshotServer`, in bounded slices between drains of the queue:
no peer, however hostile, can stop publishing and recording or make memory grow without bound.
The path of one message (encode, number, send, record, keep, check) is
:class:`~stiffmon_agent.emitter.Emitter`, a base of :class:`Publisher`.

Every message that reaches neither the socket nor the file (queue full, not encodable) is counted
in :attr:`Publisher.dropped`, which every heartbeat carries. The last tenth of the queue
(:data:`RESERVE`) is kept for messages other than ``scalars``: a loop that calls ``Agent.log``
every step faster than the thread drains fills the queue with them, and the per-step batches
(``columns``: thousands of steps' losses each), events and the ``bye`` must still get in. A full
queue is said on screen: a ``queue-full`` warning event (log-spaced) with the count so far.
Heartbeats are not recorded, except one whenever ``dropped`` has grown and a last one just before
``bye``, so a session file says how many messages its run lost.

Sockets never block the thread (every send is non-blocking), so :meth:`Publisher.close` writes
everything queued to the session file even when no peer reads. A SIGKILL of the training process
loses what is still queued: at most one drain interval of messages (:attr:`Publisher.interval`:
``batch_interval``, 250 ms, while a monitor subscribes; ``idle_interval``, which the agent sets
to 500 ms, while none does). The PUB socket is an XPUB so that the thread knows whether anyone
subscribes: each wake costs ~1 ms of CPU beside a busy training loop whatever it carries (on
the 2-core machine, a no-op after a 0.1 s sleep took 16 µs, ``np.array`` of 35 floats 60 µs
and ``torch.stack`` of 35 scalars 400 µs against 13 µs hot), so the wakes are few: 4 a second
while watched (more would cost ~40 µs per 3 ms step, not 19), 2 while nobody watches.

History (:mod:`~stiffmon_agent.history`): every heavy measurement (matrices, curves, spectra,
events, hello), every step's per-step scalars (the ``columns`` batches appended into chunks of
up to 65,536 steps, about 16–40 bytes per step) and the values of ``scalars`` messages
(measurement results, coverage counts, ``Agent.log`` values: one sparse column per name, up to
``max_scalar_history`` values, default 1,000,000, beyond which the older half of the busiest
name is thinned to every other value). A late joiner gets the whole run in a few messages.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from stiffmon import protocol as p
from stiffmon.session import SessionWriter
from stiffmon.subscriptions import Subscriptions
from stiffmon.transport import CurveKeys, Endpoint
from stiffmon_agent import fork_guard
from stiffmon_agent.agent_sockets import Wakeup, bind_pair, bind_pub
from stiffmon_agent.emitter import Emitter
from stiffmon_agent.history import History
from stiffmon_agent.history_seq_order import seq_ordered
from stiffmon_agent.outgoing import Outgoing
from stiffmon_agent.snapshots import SnapshotServer
from stiffmon_agent.userlog import log_spaced

RESERVE = 0.1
"""Fraction of the queue only messages other than ``scalars`` may fill (at least one slot)."""


class Publisher(Emitter):
    """Background publisher thread.

    Args:
        run: Run id.
        endpoint: ``tcp://host:port`` to bind (snapshot port = port + 1); None: 127.0.0.1 and the
            first free pair from 5555; ``False``-like ``""``: do not open sockets at all.
        record: Optional ``.stiff`` path to append every message (heartbeats excepted) to.
        fsync: The session writer's fsync policy.
        queue_size: Bound of the queue from the training thread.
        heartbeat_interval: Seconds between heartbeats.
        max_scalar_history: Bound on the values of ``scalars`` messages (measurement results,
            coverage, ``Agent.log``; one per name per message) kept for snapshots; per-step
            ``columns`` are all kept.
        curve: Server CURVE keys: only clients whose public key is authorised get data.
        warn: Called with one-line warnings (never raises into training).
    """

    def __init__(
        self,
        run: str,
        *,
        endpoint: str | None = None,
        record: str | os.PathLike[str] | None = None,
        fsync: Any = "never",
        queue_size: int = 10_000,
        heartbeat_interval: float = 1.0,
        max_scalar_history: int = 1_000_000,
        curve: CurveKeys | None = None,
        warn: Callable[[str], None] = lambda s: None,
    ) -> None:
        self.run = run
        self._endpoint_req = endpoint
        self._record = Path(record) if record else None
        self._fsync = fsync
        self._queue: queue.Queue[Outgoing | None] = queue.Queue(maxsize=queue_size)
        # scalars are refused from here on: the rest is for columns, events, the bye
        self._shed_from = max(1, queue_size - max(1, int(queue_size * RESERVE)))
        self.queue_dropped = 0  # of ``dropped``: refused by a full queue
        self._queue_full_said = 0  # ``queue_dropped`` in the last queue-full event
        self._queue_full_events = 0
        self._heartbeat_interval = heartbeat_interval
        self._history = History(run, max_scalar_history)
        self._curve = curve
        self._warn = warn
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._wake = Wakeup()  # ends the thread's wait early (stop, a full batch, a subscriber)
        self._thread = threading.Thread(target=self._main, name=f"stiffmon-{run}", daemon=True)
        self.endpoint: Endpoint | None = None
        self.dropped = 0  # messages that reached neither the socket nor the file
        self.unrecorded = 0  # messages not written because recording stopped
        self._recorded_dropped = 0  # ``dropped`` in the last heartbeat written to the file
        self.seq = -1
        self._last_step = 0  # highest step seen, for heartbeats
        self.published = 0
        self.snapshots: SnapshotServer | None = None
        self.error: str | None = None
        self._nonfinite_streak = 0
        self._problems: set[str] = set()  # why a batch's values failed (build_columns)
        self._problems_said: set[str] = set()
        self.batch_interval = 0.25  # seconds between drains of the queue while watched
        self.idle_interval = 0.25  # ... while no monitor subscribes
        self._subs = Subscriptions()
        self.pub_resets = 0  # times the PUB socket was replaced because a peer flooded it
        self.cpu_seconds = 0.0  # CPU time this thread spent publishing (counts in the budget)
        self.on_wake: Callable[[], None] | None = None  # called at every wake (column batches)
        # each published message but heartbeats, on this thread, after it was numbered and
        # encoded (integrations.wandb); a sink that raises is said and removed
        self.sinks: list[Callable[[p.Message], None]] = []

    # ------------------------------------------------------------------ training-thread side

    def start(self, timeout: float = 10.0) -> None:
        """Start the thread and wait until its sockets are bound (or binding failed)."""
        self._thread.start()
        self._ready.wait(timeout)

    def submit(self, item: Outgoing, wake: bool = False) -> bool:
        """Queue an item without blocking; False (and counted) if the queue is full.
        ``wake``: drain the queue now rather than at the next interval (a full batch of a
        fast loop: waiting 0.5 s would let batches pile up)."""
        try:
            if item.cls is p.Scalars and self._queue.qsize() >= self._shed_from:
                raise queue.Full
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            self.queue_dropped += 1
            return False
        if wake:
            self._wake.set()
        return True

    def close(self, timeout: float = 5.0) -> bool:
        """Flush what is queued (up to ``timeout`` seconds), then stop; True if fully flushed."""
        if not self._thread.is_alive():
            return True
        self._wake.set()  # drain now, not at the end of an idle wait
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def interval(self) -> float:
        """Seconds between drains now: ``batch_interval`` while a monitor subscribes, else
        ``idle_interval`` (never shorter)."""
        if self.subscriptions:
            return self.batch_interval
        return max(self.batch_interval, self.idle_interval)

    @property
    def subscriptions(self) -> int:
        """Topics subscribed to on the PUB socket (0: nobody watches)."""
        return self._subs.topics

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def snapshots_served(self) -> int:
        """Snapshots sent in full."""
        return self.snapshots.stats.served if self.snapshots is not None else 0

    # ------------------------------------------------------------------ thread side

    def _main(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        auth = None
        writer: SessionWriter | None = None
        sockets = None
        try:
            if self._curve is not None and self._curve.authorized_dir is not None:
                from zmq.auth.thread import ThreadAuthenticator

                auth = ThreadAuthenticator(ctx)
                auth.start()
                auth.configure_curve(domain="*", location=str(self._curve.authorized_dir))
            try:
                if self._endpoint_req != "":
                    bound = bind_pair(ctx, self._endpoint_req, self._curve, self._warn)
                    if isinstance(bound, str):
                        self.error = bound
                        self._warn(f"stiffmon: {bound}; not publishing (training goes on)")
                    else:
                        pair, self.endpoint = bound
                        sockets = list(pair)
                        fork_guard.hold(self.endpoint.port, self.endpoint.port + 1)
            except Exception as exc:  # never let transport problems reach training
                self.error = f"transport failed: {exc}"
                self._warn(f"stiffmon: {self.error}; not publishing (training goes on)")
            if self._record is not None:
                try:
                    self._record.parent.mkdir(parents=True, exist_ok=True)
                    writer = SessionWriter(self._record, fsync=self._fsync)
                except Exception as exc:
                    self._warn(f"stiffmon: cannot record to {self._record}: {exc}")
            self._ready.set()
            self._loop(ctx, sockets, writer)
        except Exception as exc:  # pragma: no cover - last resort, keep training alive
            self.error = f"publisher thread failed: {exc}"
            self._warn(f"stiffmon: {self.error}")
        finally:
            self._ready.set()
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.close()
            with contextlib.suppress(Exception):
                self._wake.watch(None)
            if sockets is not None:
                for s in sockets:
                    s.close(linger=200)
            if self.endpoint is not None and sockets is not None:
                fork_guard.release(self.endpoint.port, self.endpoint.port + 1)
            if auth is not None:
                auth.stop()
            ctx.term()
            self._wake.close()

    def _history_frames(self, first_seq: bool) -> list[list[bytes]]:
        if first_seq:
            return self._history.frames()
        return [frames for _, frames in seq_ordered(self._history)]

    def _loop(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        sockets: list[zmq.Socket[bytes]] | None,
        writer: SessionWriter | None,
    ) -> None:
        pub, router = sockets if sockets else (None, None)
        self._wake.watch(pub)
        server = None
        if router is not None:
            server = self.snapshots = SnapshotServer(
                router, self.run, lambda first_seq: (self._history_frames(first_seq), self.seq)
            )
        next_heartbeat = time.monotonic() + self._heartbeat_interval
        finished = False
        serving = False
        while not finished:
            # Wake up at a fixed pace and drain in batches, rather than once per item: fewer GIL
            # hand-offs with the training thread (which only ever does a non-blocking put). While
            # a snapshot is flowing, wake up sooner to send its next slice.
            self._wake.wait(0.005 if serving else self.interval)
            started = time.thread_time()
            if pub is not None and sockets is not None:
                self._subs.read(pub)
                if self._subs.flooded:
                    pub, writer = self._replace_pub(ctx, pub, writer)
                    sockets[0] = pub
                    self._wake.watch(pub)
            if self.on_wake is not None:
                try:
                    self.on_wake()
                except Exception as exc:  # never let it stop publishing
                    self._warn(f"stiffmon: {exc}")
            batch: list[Outgoing | None] = []
            while len(batch) < 20_000:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for it in batch:
                if it is None:
                    finished = True
                    continue
                writer = self._emit(it, pub, writer)
            writer = self._say_queue_full(pub, writer)
            if server is not None and not self._stop.is_set():
                server.read_requests()
                server.pump()
                serving = server.busy  # a peer is reading: come back soon with more
            now = time.monotonic()
            if now >= next_heartbeat and pub is not None:
                next_heartbeat = now + self._heartbeat_interval
                writer = self._heartbeat(pub, writer, record=self.dropped > self._recorded_dropped)
            self.cpu_seconds += time.thread_time() - started
            if self._stop.is_set() and self._queue.empty():
                finished = True
        if server is not None:
            server.drop_all()

    def _say_queue_full(
        self, pub: zmq.Socket[bytes] | None, writer: SessionWriter | None
    ) -> SessionWriter | None:
        """A ``queue-full`` warning event when messages were refused since the last drain (the
        1st, 2nd, 5th, 10th ... such drain); the writer still recording."""
        lost = self.queue_dropped
        if lost <= self._queue_full_said:
            return writer
        self._queue_full_said = lost
        self._queue_full_events += 1
        if not log_spaced(self._queue_full_events):
            return writer
        text = (
            f"the publish queue ({self._queue.maxsize} messages) was full: {lost} message(s) "
            "dropped so far, Agent.log values and measurements first (per-step values keep a "
            "reserve); the loop submits faster than this thread sends"
        )
        if self._queue_full_events == 1:
            self._warn(f"stiffmon: {text}")
        return self._warning(self._last_step, "queue-full", text, {"dropped": lost}, pub, writer)

    def _replace_pub(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        pub: zmq.Socket[bytes],
        writer: SessionWriter | None,
    ) -> tuple[zmq.Socket[bytes], SessionWriter | None]:
        """Close a flooded PUB socket (dropping every peer and what they queued) and bind a
        fresh one at the same address; say so at the 1st, 2nd, 5th, 10th ... time. Returns the
        fresh socket and the writer still recording."""
        why = self._subs.flooded
        self._subs.reset()
        self.pub_resets += 1
        pub.close(0)
        assert self.endpoint is not None
        fresh = bind_pub(ctx, self.endpoint, self._curve)  # raises: the thread's last resort
        if log_spaced(self.pub_resets):
            text = (
                f"a peer flooded the publish port ({why}): the socket was bound again, every "
                f"peer dropped (monitors reconnect); {self.pub_resets} time(s) so far"
            )
            self._warn(f"stiffmon: {text}")
            attrs = {"resets": self.pub_resets}
            writer = self._warning(self._last_step, "publish-reset", text, attrs, fresh, writer)
        return fresh, writer
