"""Where the monitor's messages come from: live endpoints or recorded sessions (no Textual here).

Both sources hand decoded messages to the app in batches; the app applies them to the
:class:`~stiffmon.store.Store` on its own thread, so ingest (socket reads, decoding, file reads)
never blocks drawing.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stiffmon import protocol as p
from stiffmon.client import Client
from stiffmon.reconnect import CALM, FIRST_DELAY, MAX_DELAY
from stiffmon.session import SessionMerge
from stiffmon.store import Store
from stiffmon.transport import CurveKeys, Endpoint, EndpointError, parse_endpoint

HEAVY = ("matrix", "curve", "spectrum")
AUTO_SPEEDS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)


class LiveSource:
    """Polls a :class:`~stiffmon.client.Client` on a worker thread into a queue.

    Explicit endpoints are connected once and ZeroMQ reconnects to them for as long as the
    monitor runs (an agent restarted on the same address is picked up: its new run id triggers a
    snapshot). With ``discover``, ``endpoints`` are the local registry's (as
    :func:`stiffmon.sources.resolve` found them) and the registry is re-read every ``rescan``
    seconds: every run that appears in it is attached, and an address stays attached only while
    the run registered there runs. Once that run said bye, its entry is gone (or stale:
    :func:`stiffmon.registry.stale`), or its connection was lost, the monitor disconnects from
    the address and forgets it (the run's data stay, finished or cut off), so whatever takes the
    port next is not attached: a later run registered there is attached afresh (a new run id: a
    snapshot), and only registered runs' messages are taken at all. A run still registered whose
    connection was lost (its agent rebinds its socket after a subscription flood) is attached
    again at the next scan.

    Args:
        endpoints: Addresses to subscribe to from the start.
        curve: Client CURVE keys.
        discover: Keep watching the local registry for new runs.
        registry: Registry directory (default :func:`stiffmon.registry.registry_dir`).
        rescan: Seconds between registry scans.
    """

    def __init__(
        self,
        endpoints: Sequence[Endpoint | str],
        curve: CurveKeys | None = None,
        *,
        discover: bool = False,
        registry: Path | None = None,
        rescan: float = 1.0,
    ) -> None:
        self.endpoints: list[Endpoint | str] = list(endpoints)
        self.curve = curve
        self.discover = discover
        self.registry = registry
        self.rescan = rescan
        self.queue: deque[p.AnyMessage] = deque()
        self.stop = threading.Event()
        self.client: Client | None = None
        self.error = ""
        self.warnings: deque[str] = deque(maxlen=20)  # connections dropped and made again
        self.cut_off: dict[str, str] = {}  # run -> address whose connection is lost
        self._known = set() if discover else {str(e) for e in self.endpoints}  # attached
        self._found: dict[str, str] = {}  # discovered address -> the run registered there
        self._registered: set[str] = set()  # every run seen in the registry (discover: taken)
        self._lost: dict[str, tuple[str, int, float]] = {}  # address -> (run, losses, last)
        self._gone: dict[str, str] = {}  # run -> address forgotten before its bye (cut off)
        self._last_scan = -math.inf

    def scan(self) -> list[str]:
        """Attach the registry's runs not attached yet (to the client once it runs); forget the
        addresses whose run is no longer registered there (ended, or another run's now)."""
        from stiffmon.registry import RunEntry, list_runs

        self._last_scan = time.monotonic()
        try:
            entries = list_runs(self.registry)
        except OSError as exc:
            self.error = f"registry: {exc}"
            return []
        here: dict[str, RunEntry] = {}
        for entry in entries:  # oldest first: the newest entry of an address wins
            try:
                here[str(parse_endpoint(entry.endpoint))] = entry
            except EndpointError as exc:  # a malformed entry: say so, keep watching the others
                self.error = f"registry entry {entry.run}: {exc}"
        self._registered.update(e.run for e in here.values())
        for address, run in list(self._found.items()):
            now = here.get(address)
            if now is None or now.run != run or run in self._ended:
                self.forget(address)
        added = []
        for address, entry in here.items():
            if address in self._known or entry.run in self._ended:
                continue
            lost, losses, last = self._lost.get(address, ("", 0, -math.inf))
            if lost == entry.run:  # the same run: after a wait, and say so
                if self._last_scan < last + min(MAX_DELAY, FIRST_DELAY * 2 ** (losses - 1)):
                    continue
                self.warnings.append(f"{address} lost its connection; attached again")
                if self.client is not None:
                    self.client.stats.reconnects += 1
            ep = self.client.add_endpoint(address, reconnect=False) if self.client else address
            self._gone.pop(entry.run, None)
            self._known.add(address)
            self._found[address] = entry.run
            self.endpoints = [*self.endpoints, ep]
            added.append(address)
        return added

    def forget(self, address: str) -> None:
        """Disconnect from a discovered address; its runs' data stay."""
        if self.client is not None:
            self.client.remove_endpoint(address)
        self._dropped(address)

    def _dropped(self, address: str) -> None:
        run = self._found.pop(address, None)
        if run is not None and run not in self._ended:  # cut off until attached again
            self._gone[run] = address
        self._known.discard(address)
        self.endpoints = [e for e in self.endpoints if str(e) != address]

    def _note_loss(self, address: str, run: str) -> None:
        """``address`` (found for ``run``) lost its connection: attach it again, while ``run``
        is registered there, no sooner than 0.5 s from now, twice as long for each loss within a
        minute of the last (up to 30 s), so a peer that breaks every connection costs one per
        wait (as in :mod:`stiffmon.reconnect`)."""
        lost, losses, last = self._lost.get(address, ("", 0, -math.inf))
        now = time.monotonic()
        again = lost == run and now - last < CALM
        self._lost[address] = (run, losses + 1 if again else 1, now)

    @property
    def _ended(self) -> set[str]:
        """The runs that said bye (the client's record of them)."""
        return self.client.said_bye if self.client is not None else set()

    def _ended_run(self, run: str) -> None:
        """``run`` said bye: forget the address it was found at."""
        for address, found in list(self._found.items()):
            if found == run:
                self.forget(address)

    def run(self) -> None:
        """Worker body: until :attr:`stop` is set."""
        try:
            if self.discover:  # registered runs only, each address found by scan()
                self.endpoints, self._known, self._found = [], set(), {}
                self.client = Client([], curve=self.curve, accept=self._registered.__contains__)
            else:
                self.client = Client(self.endpoints, curve=self.curve)
        except Exception as exc:  # a bad endpoint: shown in the status line
            self.error = str(exc)
            return
        try:
            while not self.stop.is_set():
                if self.discover and time.monotonic() - self._last_scan >= self.rescan:
                    self.scan()
                for msg, _ in self.client.poll(0.1):
                    self.queue.append(msg)
                    if self.discover and isinstance(msg, p.Bye):
                        self._ended_run(msg.run)
                for address in self.client.take_detached():  # its connection was lost
                    self._note_loss(address, self._found.get(address, ""))
                    self._dropped(address)
                self.warnings.extend(self.client.take_warnings())
                self.cut_off = {**self._gone, **self.client.cut_off()}
        finally:
            self.client.close()

    def feed(self, store: Store) -> list[str]:
        """Apply what arrived to ``store``, with the counts and lost connections; return the
        connection warnings since the last call."""
        store.extend(self.drain())
        store.malformed = self.malformed
        cut_off = self.cut_off
        for run, rd in store.runs.items():
            rd.cut_off = cut_off.get(run, "")
        return self.take_warnings()

    def drain(self, limit: int = 50_000) -> list[p.AnyMessage]:
        out: list[p.AnyMessage] = []
        while self.queue and len(out) < limit:
            out.append(self.queue.popleft())
        return out

    @property
    def malformed(self) -> int:
        return self.client.stats.malformed if self.client else 0

    @property
    def reconnects(self) -> int:
        """Connections the client made again after libzmq gave them up (an oversized frame)."""
        return self.client.stats.reconnects if self.client else 0

    def take_warnings(self) -> list[str]:
        """The connection warnings since the last call, oldest first."""
        out = []
        while self.warnings:
            out.append(self.warnings.popleft())
        return out

    def describe(self, short: bool = False, word: str = "live") -> str:
        """``live: <addresses>``; ``short``: how many, where there are several; ``word`` in
        place of ``live`` (``listening`` once every run is over)."""
        n = len(self.endpoints)
        from stiffmon.tunnel import tunnel_label  # an ssh tunnel's local end: its ssh:// source

        labels = (tunnel_label(str(e)) for e in self.endpoints)
        where = f"{n} addresses" if short and n > 1 else ", ".join(labels)
        if self.discover:
            idle = "no live run" if self._registered else "no run yet"
            return f"{word}: {where or idle} (watching for local runs)"
        return f"{word}: {where}" if where else f"{word}: no endpoint"


@dataclass
class ReplaySource:
    """Recorded sessions on a timeline: play, pause, speed, seek by measurement, follow.

    All messages of all files are merged by time. The timeline position is an index into that
    list; the store always holds exactly the messages before it (seeking back rebuilds it).
    :meth:`open` shows everything, paused (``at_end``, the default), or puts the timeline at the
    start and plays it at :attr:`speed` (``stiffmon replay``). The clock never runs past the last
    message read.
    """

    files: Sequence[Path]
    follow: bool = False
    speed: float = 10.0  # ×, or math.inf: as fast as possible
    at_end: bool = True  # open(): everything at once, paused (tests, screenshots); False: play
    messages: list[p.AnyMessage] = field(default_factory=list)
    position: int = 0
    playing: bool = False
    clock: float = 0.0  # recorded time at the position
    notes: list[str] = field(default_factory=list)
    skipped: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _merge: SessionMerge = field(default_factory=SessionMerge)

    def load(self) -> None:
        """Read every intact message, each message of a run once (files holding the same run are
        merged by ``seq``); note files that are not sessions (left out, the others still read),
        damaged records, torn tails, skipped records and a newer protocol version, worst first."""
        merge = self._merge = SessionMerge()
        msgs: list[p.AnyMessage] = []
        for path in self.files:
            msgs.extend(merge.read_more_or_note(path))
        self._note(merge)
        msgs.sort(key=lambda m: m.t)
        with self._lock:
            self.messages = msgs

    def _note(self, merge: SessionMerge) -> None:
        """Refresh :attr:`notes` and :attr:`skipped` from the merge's reports."""
        notes = merge.notes(names=True)
        notes.sort(key=lambda n: 0 if "upgrade stiffmon" in n else 1)  # the status line shows one
        self.notes = notes
        self.skipped = sum(r.skipped for r in merge.reports.values())

    @property
    def unopened(self) -> dict[Path, str]:
        """Files left out as not sessions (or unreadable), each with why."""
        return self._merge.unopened

    def auto_speed(self, seconds: float = 20.0) -> float:
        """The slowest of 1, 2, 5, 10, … 1000 × that plays the whole session in ``seconds``."""
        duration = self.t_end - self.t0
        for speed in AUTO_SPEEDS:
            if duration / speed <= seconds:
                return speed
        return AUTO_SPEEDS[-1]

    def open(self, store: Store) -> None:
        """Initial timeline: the start, playing; or with :attr:`at_end`, the end, paused."""
        if self.at_end:
            self.seek(store, len(self.messages))
            self.playing = self.follow
        else:
            self.seek(store, 0)
            self.playing = True

    def follow_loop(self) -> None:
        """Worker body for ``--follow``: append what the writers add (each message once)."""
        merge = self._merge
        while not self.stop.is_set():
            new: list[p.AnyMessage] = []
            for path in self.files:
                new.extend(merge.read_more_or_note(path))
            self._note(merge)
            if new:
                new.sort(key=lambda m: m.t)
                with self._lock:
                    self.messages.extend(new)
            self.stop.wait(0.25)

    @property
    def t0(self) -> float:
        return self.messages[0].t if self.messages else 0.0

    @property
    def t_end(self) -> float:
        return self.messages[-1].t if self.messages else 0.0

    def advance(self, store: Store, dt: float, batch: int = 20_000) -> int:
        """Move the timeline by ``dt`` seconds of wall time at the current speed; apply messages.

        ``dt`` counts at most 0.5 s: a slow start or frame does not make the timeline jump.
        """
        if not self.playing:
            return 0
        dt = min(dt, 0.5)
        with self._lock:
            n = len(self.messages)
            if self.position >= n:
                return 0
            if self.speed == float("inf"):
                end = min(n, self.position + batch)
            else:
                if (
                    self.position == 0
                ):  # playing from the start: the clock starts at the first message
                    self.clock = max(self.clock, self.messages[0].t)
                self.clock += dt * self.speed
                times = [m.t for m in self.messages[self.position : self.position + batch]]
                end = self.position + bisect.bisect_right(times, self.clock)
            chunk = self.messages[self.position : end]
            self.position = end
            if chunk:
                self.clock = max(self.clock, chunk[-1].t)
            if self.position >= n:
                self.clock = min(self.clock, self.messages[-1].t)  # never past the data
            else:
                self.clock = min(self.clock, self.messages[self.position].t)
        store.source_malformed = self.skipped  # records skipped in the files: "malformed N"
        store.extend(chunk, replay=True)
        if self.position >= len(self.messages) and not self.follow:
            self.playing = False
        return len(chunk)

    def seek(self, store: Store, position: int) -> None:
        """Put the timeline at ``position`` (0 … len); the store is rebuilt when going back."""
        with self._lock:
            position = max(0, min(position, len(self.messages)))
            if position < self.position:
                store.runs.clear()
                store.version += 1
                self.position = 0
            chunk = self.messages[self.position : position]
            self.position = position
        store.source_malformed = self.skipped  # records skipped in the files: "malformed N"
        store.extend(chunk, replay=True)
        self.clock = self.messages[position - 1].t if position else self.t0

    def measurement_positions(self) -> list[int]:
        """Positions just after each heavy measurement (a new step's matrix/curve/spectrum)."""
        out, last = [], None
        for i, m in enumerate(self.messages):
            if m.KIND in HEAVY and (m.run, m.step) != last:
                last = (m.run, m.step)
                out.append(i + 1)
        return out

    def step_measurement(self, store: Store, direction: int) -> None:
        marks = self.measurement_positions()
        if not marks:
            return
        if direction > 0:
            i = bisect.bisect_right(marks, self.position)
            target = marks[i] if i < len(marks) else len(self.messages)
        else:
            i = bisect.bisect_left(marks, self.position) - 1
            target = marks[i] if i >= 0 else 0
        self.seek(store, target)

    def describe(self) -> str:
        speed = "max" if self.speed == float("inf") else f"{self.speed:g}×"
        state = "▶" if self.playing else "⏸"
        total = len(self.messages)
        rec = self.clock - self.t0 if total else 0.0
        return f"replay {state} {speed}  {self.position}/{total} msgs  t+{rec:,.1f}s" + (
            "  following" if self.follow else ""
        )
