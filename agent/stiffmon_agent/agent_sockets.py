"""The agent's two sockets: binding the XPUB/ROUTER pair, and counting who subscribes.

* :func:`bind_pair`: the PUB socket (an XPUB, so that the publisher knows whether anyone
  subscribes) and the snapshot ROUTER on ``port``/``port + 1``, with the frame size limits and
  CURVE keys set before binding; the first free pair from :data:`~stiffmon.transport.DEFAULT_PORT`
  when no endpoint is asked for.
* :func:`read_subscriptions`: the subscriptions an XPUB has passed up since the last read.
"""

from __future__ import annotations

from collections.abc import Callable

import zmq

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
        for s in (pub, router):
            s.setsockopt(zmq.LINGER, 0)
            limit_frames(s, MAX_CONTROL_FRAME_BYTES)  # they receive requests, subscriptions
            if curve is not None:
                s.curve_secretkey = curve.secret
                s.curve_publickey = curve.public
                s.curve_server = True
        pub.setsockopt(zmq.SNDHWM, 10_000)
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


def read_subscriptions(pub: zmq.Socket[bytes], count: int, limit: int = 1000) -> int:
    """``count`` (topics subscribed to) updated by what the XPUB passed up since the last call
    (at most ``limit`` frames): +1 per first subscription to a topic, -1 per last
    unsubscription (a peer that goes away unsubscribes), never below 0; anything else is
    ignored. Never blocks."""
    for _ in range(limit):
        try:  # EVENTS first: a ZMQError per empty read costs ~50 µs on a cold thread
            if not pub.get(zmq.EVENTS) & zmq.POLLIN:
                break
            frame = pub.recv(zmq.NOBLOCK)
        except zmq.ZMQError:  # nothing more (or the socket is gone)
            break
        if frame[:1] == b"\x01":
            count += 1
        elif frame[:1] == b"\x00":
            count = max(0, count - 1)
    return count
