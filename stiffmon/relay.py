"""``stiffmon relay``: fan many agents in to one address (an XSUB/XPUB proxy).

Live updates pass through untouched, in a small loop that also keeps subscription floods from the
relay and its agents (:mod:`stiffmon.relay_proxy`). The relay's snapshot port (its port + 1)
answers a snapshot request by asking every upstream agent for its snapshot, all at once, and
streaming their messages and per-run end markers back, followed by one final done marker.

Bounded in time and memory whatever the peers do:

* upstreams are asked in parallel over one persistent DEALER each (``ZMQ_IMMEDIATE``: an upstream
  that is not connected is skipped, once its socket has had :data:`CONNECT_GRACE` to connect,
  so that a relay asked as it starts still answers with every run's history); the answer waits
  at most ``snapshot_timeout`` for
  the slowest, and an upstream that timed out is not waited for again until it answers in full;
* requests that arrive while an answer is being gathered coalesce: they are all answered by the
  next gathering;
* replies are streamed, not stored; a requester whose queue is full is dropped from the answer
  (it asks again); every receiving socket has ``ZMQ_MAXMSGSIZE``;
* the final done marker says how many upstreams answered in full (``upstream``) and how many
  did not (``missing``: timed out, not connected, or, behind a relay of relays, missing there),
  so that a client holds the runs the answer left out and asks again rather than showing them
  from their latest step only (their history lost for good).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence

import zmq

from stiffmon.reconnect import Links
from stiffmon.relay_proxy import Proxy
from stiffmon.transport import (
    MAX_CONTROL_FRAME_BYTES,
    MAX_DATA_FRAME_BYTES,
    SNAPSHOT_DONE,
    SNAPSHOT_REQUEST,
    CurveKeys,
    Endpoint,
    decode_control,
    encode_control,
    exposure_warning,
    limit_frames,
    parse_endpoint,
    snapshot_request,
    takes_first_seq_order,
)

CONNECT_GRACE = 2.0
"""Seconds a newly made snapshot socket is given to connect before its upstream is skipped
(asked meanwhile, within the answer's ``snapshot_timeout``)."""


def _missing(done: list[bytes]) -> int:
    """The ``missing`` count of an upstream relay's done marker (0: an agent's, or none)."""
    n = decode_control(done[1]).get("missing", 0) if len(done) >= 2 else 0
    return n if isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 20 else 0


def _warn_stderr(text: str) -> None:
    print(text, file=sys.stderr)


class Relay:
    """Relay threads: one runs the proxy, one gathers snapshots.

    Args:
        upstream: The agents' (or other relays') endpoints.
        bind: Where monitors connect (``tcp://host:port``; snapshot port = port + 1).
        snapshot_timeout: Seconds an answer waits for the slowest upstream.
        curve_upstream: Client CURVE keys for upstreams that require authentication.
        curve_bind: Server CURVE keys: monitors must present an authorised key.
        warn: Called with warnings (binding a non-loopback address without CURVE, a flood, an
            upstream connection made again).
    """

    def __init__(
        self,
        upstream: Sequence[str | Endpoint],
        bind: str,
        *,
        snapshot_timeout: float = 5.0,
        curve_upstream: CurveKeys | None = None,
        curve_bind: CurveKeys | None = None,
        warn: Callable[[str], None] = _warn_stderr,
    ) -> None:
        self.upstream = [u if isinstance(u, Endpoint) else parse_endpoint(u) for u in upstream]
        self.endpoint = parse_endpoint(bind)
        self.snapshot_timeout = snapshot_timeout
        self.curve_upstream = curve_upstream
        self.curve_bind = curve_bind
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._auth = None
        try:
            if curve_bind is not None and curve_bind.authorized_dir is not None:
                from zmq.auth.thread import ThreadAuthenticator

                self._auth = ThreadAuthenticator(self.ctx)
                self._auth.start()
                self._auth.configure_curve(domain="*", location=str(curve_bind.authorized_dir))
            self._stop = threading.Event()
            self.xsub = self._upstream_socket(zmq.XSUB)
            self.links = Links(self.xsub, lambda text: warn(f"stiffmon relay: upstream {text}"))
            self.router = self._bind_socket(zmq.ROUTER)
            self.router.setsockopt(zmq.SNDHWM, 1000)
            # a full requester is EAGAIN, not a hang
            self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            for u in self.upstream:
                self.links.add(u.pub)
                self.xsub.connect(u.pub)
            self._born: dict[Endpoint, float] = {}  # when each snapshot socket was made
            self._dealers: dict[Endpoint, zmq.Socket[bytes]] = {
                u: self._dealer(u) for u in self.upstream
            }
            self.dead: set[Endpoint] = set()  # timed out: not waited for until they answer again
            self._ctl_addr = f"inproc://stiffmon-relay-{id(self)}"
            self.proxy = Proxy(
                self.ctx, self.xsub, self.links, self.endpoint, curve_bind, warn, self._ctl_addr
            )
            self.router.bind(self.endpoint.snapshot)
            warning = exposure_warning("the relay", self.endpoint, self.endpoint.host, curve_bind)
            if warning:
                warn(warning)
        except BaseException:  # nothing left open for the garbage collector (it could hang)
            if hasattr(self, "links"):
                self.links.close()
            if self._auth is not None:
                self._auth.stop()
            self.ctx.destroy(linger=0)
            raise
        self._ctl = self.ctx.socket(zmq.PAIR)
        self._ctl.bind(self._ctl_addr)
        self._proxy = threading.Thread(
            target=self.proxy.run, name="stiffmon-relay-proxy", daemon=True
        )
        self._snap = threading.Thread(
            target=self._run_snapshots, name="stiffmon-relay-snapshots", daemon=True
        )
        self.snapshots_served = 0
        self.gatherings = 0
        self._first_seq: dict[bytes, bool] = {}  # each waiting requester's order

    # ------------------------------------------------------------------ sockets

    def _upstream_socket(self, kind: int) -> zmq.Socket[bytes]:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        limit_frames(s, MAX_DATA_FRAME_BYTES)
        keys = self.curve_upstream
        if keys is not None:
            s.curve_secretkey = keys.secret
            s.curve_publickey = keys.public
            s.curve_serverkey = keys.server_public
        return s

    def _bind_socket(self, kind: int) -> zmq.Socket[bytes]:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        limit_frames(s, MAX_CONTROL_FRAME_BYTES)  # requests only
        if self.curve_bind is not None:
            s.curve_secretkey = self.curve_bind.secret
            s.curve_publickey = self.curve_bind.public
            s.curve_server = True
        return s

    def _dealer(self, u: Endpoint) -> zmq.Socket[bytes]:
        d = self._upstream_socket(zmq.DEALER)
        d.setsockopt(zmq.IMMEDIATE, 1)  # no connection, no queued request: skipped at once
        d.connect(u.snapshot)
        self._born[u] = time.monotonic()
        return d

    # ------------------------------------------------------------------ threads

    def start(self) -> Relay:
        self._proxy.start()
        self._snap.start()
        return self

    def _take_requests(self, waiters: list[bytes]) -> None:
        """Move the requests waiting on the router into ``waiters`` (never blocks)."""
        for _ in range(1000):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) >= 2 and frames[1] == SNAPSHOT_REQUEST and frames[0] not in waiters:
                waiters.append(frames[0])
                self._first_seq[frames[0]] = takes_first_seq_order(frames[2:])

    def _run_snapshots(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        waiters: list[bytes] = []
        while not self._stop.is_set():
            try:
                if not waiters and not dict(poller.poll(100)):
                    continue
                self._take_requests(waiters)
                if waiters:
                    waiters = self._gather(waiters)
            except (zmq.ContextTerminated, zmq.ZMQError):
                return

    def _send(self, ident: bytes, frames: list[bytes]) -> bool:
        try:
            self.router.send_multipart([ident, *frames], flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError:  # full (a requester that does not read) or gone
            return False

    def _gather(self, waiters: list[bytes]) -> list[bytes]:
        """Answer ``waiters`` from all upstreams at once; return requests that came meanwhile."""
        self.gatherings += 1
        later: list[bytes] = []
        pending: dict[zmq.Socket[bytes], Endpoint] = {}
        unsent: dict[zmq.Socket[bytes], Endpoint] = {}  # made moments ago, not connected yet
        # the order every waiter takes: first-seq only if all of them do
        request = snapshot_request(all([self._first_seq.pop(w, False) for w in waiters]))
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)

        def ask(d: zmq.Socket[bytes], u: Endpoint) -> None:
            unsent.pop(d, None)
            try:
                d.send_multipart(request, zmq.NOBLOCK)
            except zmq.ZMQError:  # not connected: a socket made less than CONNECT_GRACE ago
                # is still connecting in the background (asked at once, a just-started relay
                # would leave that run's history out), so it is asked again meanwhile
                if time.monotonic() < self._born.get(u, 0.0) + CONNECT_GRACE:
                    unsent[d] = u
                else:
                    self.dead.add(u)
                return
            pending[d] = u
            poller.register(d, zmq.POLLIN)

        for u, d in self._dealers.items():
            ask(d, u)
        answered = 0
        missing_behind = 0  # upstreams that relays among ours could not answer for
        replying: set[Endpoint] = set()
        start = time.monotonic()
        deadline = start + self.snapshot_timeout
        while (pending or unsent) and time.monotonic() < deadline and not self._stop.is_set():
            for d, u in list(unsent.items()):
                ask(d, u)
            if (
                not unsent
                and time.monotonic() - start > 0.1
                and all(u in self.dead and u not in replying for u in pending.values())
            ):
                break  # only the ones known dead are left, silent: do not wait for them
            events = dict(poller.poll(20))
            if events.get(self.router):
                self._take_requests(later)
            for d in [d for d in events if d in pending]:
                for _ in range(1000):
                    try:
                        reply = d.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if reply and reply[0] == SNAPSHOT_DONE:
                        missing_behind += _missing(reply)
                        self.dead.discard(pending.pop(d))
                        poller.unregister(d)
                        answered += 1
                        break
                    replying.add(pending[d])
                    waiters = [w for w in waiters if self._send(w, reply)]
        self.dead.update(unsent.values())  # never connected
        for d, u in pending.items():  # drop a half-read answer: a fresh socket for next time
            self.dead.add(u)
            d.close(0)
            self._dealers[u] = self._dealer(u)
        missing = len(self.upstream) - answered + missing_behind
        done = encode_control(SNAPSHOT_DONE, {"upstream": answered, "missing": missing})
        for w in waiters:
            if self._send(w, done):
                self.snapshots_served += 1
        return later

    def close(self) -> None:
        self._stop.set()
        if self._snap.is_alive():
            self._snap.join(2 + self.snapshot_timeout)
        if self._proxy.is_alive():
            self._ctl.send(b"TERMINATE")
            self._proxy.join(2)
        self.links.close()
        self.proxy.close()
        for s in (self.xsub, self.router, self._ctl, *self._dealers.values()):
            s.close(0)
        if self._auth is not None:
            self._auth.stop()
        self.ctx.term()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
