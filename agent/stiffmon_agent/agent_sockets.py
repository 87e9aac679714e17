"""The agent's two sockets: binding the XPUB/ROUTER pair, and binding the XPUB again.

* :func:`bind_pair`: the PUB socket (an XPUB, so that the publisher knows whether anyone
  subscribes) and the snapshot ROUTER on ``port``/``port + 1``, with the frame size limits and
  CURVE keys set before binding; the first free pair from :data:`~stiffmon.transport.DEFAULT_PORT`
  when no endpoint is asked for.
* :func:`bind_pub`: a fresh XPUB, for the publisher to replace one that
  :class:`~stiffmon.subscriptions.Subscriptions` (shared with ``stiffmon relay``) finds flooded:
  libzmq keeps every distinct topic a peer subscribes to (~19 KB per random 1–1000-byte topic,
  measured: 20,000 of them grew an agent by 380 MB) and every frame a peer sends upstream until
  it is read, so a PUB socket sent more distinct topics or topic bytes than any monitor needs, or
  more frames than one read takes, is closed and bound again: every peer is dropped, genuine
  monitors reconnect by themselves and ask for what they missed.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable

import zmq

from stiffmon.subscriptions import MAX_SUBSCRIPTION_FRAME_BYTES
from stiffmon.transport import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    MAX_CONTROL_FRAME_BYTES,
    PORT_SEARCH,
    CurveKeys,
    Endpoint,
    exposure_warning,
    limit_frames,
    parse_endpoint,
)
from stiffmon_agent.snapshots import SnapshotServer

Pair = tuple[zmq.Socket[bytes], zmq.Socket[bytes]]


def bind_pair(
    ctx: zmq.Context[zmq.Socket[bytes]],
    requested: str | None,
    curve: CurveKeys | None,
    warn: Callable[[str], None],
) -> tuple[Pair, Endpoint] | str:
    """Bind the (XPUB, ROUTER) pair at ``requested`` (None: the first free default pair).

    Returns:
        The sockets and their endpoint, or why no pair could be bound.
    """
    if requested:
        candidates = [parse_endpoint(requested)]
    else:
        candidates = [Endpoint(DEFAULT_HOST, DEFAULT_PORT + 2 * i) for i in range(PORT_SEARCH)]
    last_error = ""
    for ep in candidates:
        pub = ctx.socket(zmq.XPUB)  # a PUB that tells who subscribes
        router = ctx.socket(zmq.ROUTER)
        _configure_pub(pub, curve)
        _configure(router, curve, MAX_CONTROL_FRAME_BYTES)
        SnapshotServer.configure(router)
        try:
            pub.bind(ep.pub)
            router.bind(ep.snapshot)
        except zmq.ZMQError as exc:
            last_error = f"{ep}: {exc}"
            pub.close(0)
            router.close(0)
            continue
        warning = exposure_warning("the agent", ep, ep.host, curve)
        if warning:
            warn(warning)
        return (pub, router), ep
    return f"could not bind a port pair ({last_error})"


UPSTREAM_HWM = 100
"""``ZMQ_RCVHWM`` of the XPUB. It does not bound the subscriptions libzmq takes in at once
(measured at 100: one ``getsockopt(EVENTS)`` took all 20,000 queued ones); what does is
:class:`Wakeup` reading them as they arrive and :class:`Subscriptions` replacing the socket."""


def _configure(sock: zmq.Socket[bytes], curve: CurveKeys | None, max_frame: int) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    limit_frames(sock, max_frame)
    if curve is not None:
        sock.curve_secretkey = curve.secret
        sock.curve_publickey = curve.public
        sock.curve_server = True


def _configure_pub(pub: zmq.Socket[bytes], curve: CurveKeys | None) -> None:
    limit = MAX_SUBSCRIPTION_FRAME_BYTES if curve is None else MAX_CONTROL_FRAME_BYTES
    _configure(pub, curve, limit)
    pub.setsockopt(zmq.SNDHWM, 10_000)
    pub.setsockopt(zmq.RCVHWM, UPSTREAM_HWM)


def bind_pub(
    ctx: zmq.Context[zmq.Socket[bytes]], ep: Endpoint, curve: CurveKeys | None, wait: float = 5.0
) -> zmq.Socket[bytes]:
    """A fresh XPUB bound at ``ep`` (retried for up to ``wait`` seconds while the port of the
    one just closed is released); raises ``zmq.ZMQError`` if it cannot be bound."""
    deadline = time.monotonic() + wait
    while True:
        pub = ctx.socket(zmq.XPUB)
        _configure_pub(pub, curve)
        try:
            pub.bind(ep.pub)
            return pub
        except zmq.ZMQError:
            pub.close(0)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class Wakeup:
    """The publisher thread's wait: until :meth:`set` (from any thread), a frame on the watched
    XPUB, or a timeout. Subscriptions are taken in as they arrive: libzmq moves everything a peer
    has queued into its topics at the next call on the socket, so a thread that only looked every
    0.5 s would let a flood pile up between two looks (20,000 topics: +124 MB at once)."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._lock = threading.Lock()  # no write to a descriptor closed (and reused) meanwhile
        self._open = True
        self._poller = zmq.Poller()
        self._poller.register(self._r, zmq.POLLIN)
        self._pub: zmq.Socket[bytes] | None = None

    def watch(self, pub: zmq.Socket[bytes] | None) -> None:
        """Also wake for frames on ``pub`` (None: no socket), instead of the previous one."""
        if self._pub is not None:
            self._poller.unregister(self._pub)
        self._pub = pub
        if pub is not None:
            self._poller.register(pub, zmq.POLLIN)

    def set(self) -> None:
        """End the current (or next) wait now; never blocks."""
        with self._lock:
            if self._open:
                with contextlib.suppress(OSError):  # full: a wake is pending anyway
                    os.write(self._w, b"!")

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for a wake, a frame on the XPUB or the timeout."""
        self._poller.poll(max(0, int(timeout * 1000)))
        try:
            while os.read(self._r, 4096):
                pass
        except OSError:  # drained
            pass

    def close(self) -> None:
        """Release the descriptors (later :meth:`set` calls do nothing)."""
        with self._lock:
            if self._open:
                self._open = False
                os.close(self._r)
                os.close(self._w)
