"""``stiffmon relay``: fan many agents in to one address (ZeroMQ's XSUB/XPUB proxy).

Live updates pass through :func:`zmq.proxy` untouched. The relay's snapshot port (its port + 1)
answers a snapshot request by asking every upstream agent for its snapshot and streaming all of
their messages and per-run end markers back, followed by one final done marker.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence

import zmq

from stiffmon.transport import (
    SNAPSHOT_DONE,
    SNAPSHOT_REQUEST,
    Endpoint,
    encode_control,
    parse_endpoint,
)


class Relay:
    """Relay threads: one runs the proxy, one forwards snapshots.

    Args:
        upstream: The agents' (or other relays') endpoints.
        bind: Where monitors connect (``tcp://host:port``; snapshot port = port + 1).
        snapshot_timeout: Seconds to wait for each upstream snapshot.
    """

    def __init__(
        self, upstream: Sequence[str | Endpoint], bind: str, *, snapshot_timeout: float = 5.0
    ) -> None:
        self.upstream = [u if isinstance(u, Endpoint) else parse_endpoint(u) for u in upstream]
        self.endpoint = parse_endpoint(bind)
        self.snapshot_timeout = snapshot_timeout
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._stop = threading.Event()
        self.xsub = self.ctx.socket(zmq.XSUB)
        self.xpub = self.ctx.socket(zmq.XPUB)
        self.router = self.ctx.socket(zmq.ROUTER)
        for s in (self.xsub, self.xpub, self.router):
            s.setsockopt(zmq.LINGER, 0)
        for u in self.upstream:
            self.xsub.connect(u.pub)
        self.xpub.bind(self.endpoint.pub)
        self.router.bind(self.endpoint.snapshot)
        self._ctl_addr = f"inproc://stiffmon-relay-{id(self)}"
        self._ctl = self.ctx.socket(zmq.PAIR)
        self._ctl.bind(self._ctl_addr)
        self._proxy = threading.Thread(
            target=self._run_proxy, name="stiffmon-relay-proxy", daemon=True
        )
        self._snap = threading.Thread(
            target=self._run_snapshots, name="stiffmon-relay-snapshots", daemon=True
        )
        self.snapshots_served = 0

    def start(self) -> Relay:
        self._proxy.start()
        self._snap.start()
        return self

    def _run_proxy(self) -> None:
        ctl = self.ctx.socket(zmq.PAIR)
        ctl.connect(self._ctl_addr)
        try:
            with contextlib.suppress(zmq.ContextTerminated, zmq.ZMQError):
                zmq.proxy_steerable(self.xsub, self.xpub, None, ctl)
        finally:
            ctl.close(0)

    def _run_snapshots(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if not dict(poller.poll(100)):
                    continue
                frames = self.router.recv_multipart()
            except (zmq.ContextTerminated, zmq.ZMQError):
                return
            if len(frames) < 2 or frames[1] != SNAPSHOT_REQUEST:
                continue
            self._forward(frames[0])

    def _forward(self, ident: bytes) -> None:
        runs = 0
        for u in self.upstream:
            dealer = self.ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(u.snapshot)
            try:
                dealer.send_multipart(encode_control(SNAPSHOT_REQUEST, {"v": 1}))
                deadline = time.monotonic() + self.snapshot_timeout
                while time.monotonic() < deadline:
                    if not dealer.poll(100):
                        continue
                    reply = dealer.recv_multipart()
                    if reply and reply[0] == SNAPSHOT_DONE:
                        runs += 1
                        break
                    self.router.send_multipart([ident, *reply])
            except zmq.ZMQError:
                pass
            finally:
                dealer.close(0)
        with contextlib.suppress(zmq.ZMQError):
            self.router.send_multipart([ident, *encode_control(SNAPSHOT_DONE, {"upstream": runs})])
        self.snapshots_served += 1

    def close(self) -> None:
        self._stop.set()
        self._snap.join(2)
        if self._proxy.is_alive():
            self._ctl.send(b"TERMINATE")
            self._proxy.join(2)
        for s in (self.xsub, self.xpub, self.router, self._ctl):
            s.close(0)
        self.ctx.term()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
