"""The relay's live path: upstream XSUB to the monitors' XPUB, guarded against subscription floods.

libzmq keeps every distinct topic a peer subscribes to (a trie node per byte) for as long as the
peer stays connected, and a plain XSUB/XPUB proxy also copies each one into its XSUB and on to
every agent: 20,000 long topics grew a relay by hundreds of MB and made each agent bind its PUB
socket again. So this loop, not :func:`zmq.proxy`, sits between the two sockets:

* live messages go down as they come (zero-copy frames, up to 1,000 per wake);
* subscriptions never go up as they are: the relay subscribes upstream to everything (one empty
  topic, all a monitor uses) while anyone subscribes to anything downstream, and unsubscribes a
  few seconds after the last one left, so agents still know whether anyone watches, and never
  see more than one topic from a relay;
* the XPUB refuses frames over 128 bytes (64 KiB with CURVE, whose handshake needs ~400), and once
  its peers have subscribed to more distinct topics or topic bytes than monitors need, or sent
  more frames at once than one read takes, it is closed and bound again: every peer is dropped,
  monitors reconnect by themselves and ask for what they missed;
* upstream connections that libzmq gives up (an agent that sent an oversized frame) are made
  again (:class:`~stiffmon.reconnect.Links`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import zmq

from stiffmon.reconnect import Links
from stiffmon.subscriptions import MAX_SUBSCRIPTION_FRAME_BYTES, Subscriptions
from stiffmon.transport import MAX_CONTROL_FRAME_BYTES, CurveKeys, Endpoint, limit_frames

READ_LIMIT = 1000
"""Frames taken from the XPUB in one go; more waiting is a flood."""
FORWARD_BATCH = 1000
"""Live messages forwarded per wake before the other sockets get a look."""
UPSTREAM_HOLD = 5.0
"""Seconds the upstream subscription outlives the last downstream one (monitors dropped by a
reset come back within a second; agents need not hear of it)."""


class Proxy:
    """Forward ``xsub``'s messages to an XPUB bound at ``endpoint`` (bound here: a failure raises
    ``zmq.ZMQError``); :meth:`run` in one thread until a message on ``control``.

    Args:
        ctx: The relay's context.
        xsub: The upstream socket, connected to the agents.
        links: Its connections' watcher.
        endpoint: Where monitors connect.
        curve: Server CURVE keys for the XPUB, or None.
        warn: Called with a sentence when the XPUB is bound again.
        control: ``inproc://`` address of a PAIR bound by the owner.
    """

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        xsub: zmq.Socket[bytes],
        links: Links,
        endpoint: Endpoint,
        curve: CurveKeys | None,
        warn: Callable[[str], None],
        control: str,
    ) -> None:
        self.ctx, self.xsub, self.links = ctx, xsub, links
        self.endpoint, self.curve, self.warn, self.control = endpoint, curve, warn, control
        self.xpub: zmq.Socket[bytes] | None = self._bind()
        self.subs = Subscriptions()
        self.resets = 0
        self._upstream = False  # subscribed upstream
        self._hold_until = 0.0

    def _bind(self) -> zmq.Socket[bytes]:
        s = self.ctx.socket(zmq.XPUB)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, 100)
        limit = MAX_SUBSCRIPTION_FRAME_BYTES if self.curve is None else MAX_CONTROL_FRAME_BYTES
        limit_frames(s, limit)
        if self.curve is not None:
            s.curve_secretkey = self.curve.secret
            s.curve_publickey = self.curve.public
            s.curve_server = True
        try:
            s.bind(self.endpoint.pub)
        except zmq.ZMQError:
            s.close(0)
            raise
        return s

    def run(self) -> None:
        ctl = self.ctx.socket(zmq.PAIR)
        ctl.connect(self.control)
        try:
            with contextlib.suppress(zmq.ContextTerminated, zmq.ZMQError):  # closed under it
                self._loop(ctl)
        finally:
            ctl.close(0)

    def _loop(self, ctl: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        for s in (ctl, self.xsub, self.links.monitor):
            poller.register(s, zmq.POLLIN)
        if self.xpub is not None:
            poller.register(self.xpub, zmq.POLLIN)
        while True:
            now = time.monotonic()
            hold = self._hold_until - now + 0.01 if now < self._hold_until else 1.0
            wait = min(1.0, self.links.wait(now), hold)
            events = dict(poller.poll(int(wait * 1000)))
            if ctl in events:
                return
            if self.xsub in events:
                self._forward()
            if self.xpub is not None and self.xpub in events:
                self.subs.read(self.xpub, READ_LIMIT)
                if self.subs.flooded:
                    poller.unregister(self.xpub)
                    self._replace(self.subs.flooded)
                    if self.xpub is not None:
                        poller.register(self.xpub, zmq.POLLIN)
            elif self.xpub is None and self._rebind():
                poller.register(self.xpub, zmq.POLLIN)
            now = time.monotonic()
            self.links.read(now)
            self.links.tick(now)
            self._sync_upstream(now)

    def _forward(self) -> None:
        xpub = self.xpub
        for _ in range(FORWARD_BATCH):
            try:
                frames = self.xsub.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if xpub is not None:
                with contextlib.suppress(zmq.Again):  # an XPUB drops for a full peer anyway
                    xpub.send_multipart(frames, zmq.NOBLOCK, copy=False)

    def _replace(self, why: str) -> None:
        """Close the XPUB (its peers and their topics go with it) and bind it again."""
        assert self.xpub is not None
        self.xpub.close(0)
        self.xpub = None
        self.resets += 1
        self.subs.reset()
        self._hold_until = time.monotonic() + UPSTREAM_HOLD
        self.warn(
            f"stiffmon relay: a peer flooded {self.endpoint} ({why}): bound it again; "
            "monitors reconnect"
        )
        deadline = time.monotonic() + 5.0
        while not self._rebind() and time.monotonic() < deadline:
            time.sleep(0.01)  # the port of the socket just closed is released

    def _rebind(self) -> bool:
        try:
            self.xpub = self._bind()
        except zmq.ZMQError:
            return False
        return True

    def _sync_upstream(self, now: float) -> None:
        """Subscribe upstream to everything while anyone downstream subscribes (or just did)."""
        want = self.subs.topics > 0 or now < self._hold_until
        if want != self._upstream:
            with contextlib.suppress(zmq.Again):
                self.xsub.send(b"\x01" if want else b"\x00", zmq.NOBLOCK)
                self._upstream = want

    def close(self) -> None:
        """Close the XPUB (after :meth:`run` returned)."""
        if self.xpub is not None:
            self.xpub.close(0)
