"""Counting who subscribes to an XPUB, and telling when a peer floods it (the agent's PUB socket
and ``stiffmon relay``'s monitor port).

libzmq keeps every distinct topic a peer subscribes to (a trie node per byte: 20,000 random topics
of up to 1,000 bytes grew an agent by 380 MB, a relay by 808 MB) for as long as the peer stays
connected, and queues every frame a peer sends upstream until it is read; neither has a limit.
Monitors subscribe to everything (one empty topic), so an XPUB sent more distinct topics or topic
bytes than that, or more frames than one read takes, is to be closed and bound again by its owner.
"""

from __future__ import annotations

from dataclasses import dataclass

import zmq

MAX_SUBSCRIPTION_FRAME_BYTES = 128
"""``ZMQ_MAXMSGSIZE`` of an XPUB (the agent's, the relay's) without CURVE: a subscription is a
flag byte and a topic (a monitor's is empty), the handshake's READY ~30 bytes; a bigger frame
disconnects its peer. With CURVE the handshake needs ~400 bytes, and only authorised peers get
that far: :data:`~stiffmon.transport.MAX_CONTROL_FRAME_BYTES` then."""

MAX_TOPICS = 64
MAX_TOPIC_BYTES = 4096
"""Distinct topics, and their bytes, subscribed to at once beyond which the XPUB is replaced."""


@dataclass
class Subscriptions:
    """Who subscribes to an XPUB, from what it passes up (a first subscription to a topic, a
    last unsubscription), and whether a peer floods it.

    Attributes:
        topics: Distinct topics subscribed to now (0: nobody watches).
        topic_bytes: Their bytes.
        flooded: Why the socket must be replaced (empty: it need not).
    """

    topics: int = 0
    topic_bytes: int = 0
    flooded: str = ""

    def read(self, pub: zmq.Socket[bytes], limit: int = 1000) -> None:
        """Take in what ``pub`` passed up since the last call (at most ``limit`` frames; more
        pending is a flood). Anything but (un)subscriptions is ignored. Never blocks."""
        n = 0
        while n < limit:
            try:  # EVENTS first: a ZMQError per empty read costs ~50 µs on a cold thread
                if not int(pub.get(zmq.EVENTS)) & zmq.POLLIN:
                    break
                frame = pub.recv(zmq.NOBLOCK)
            except zmq.ZMQError:  # nothing more (or the socket is gone)
                break
            n += 1
            if frame[:1] == b"\x01":
                self.topics += 1
                self.topic_bytes += len(frame) - 1
            elif frame[:1] == b"\x00" and self.topics:
                self.topics -= 1
                self.topic_bytes = max(0, self.topic_bytes - (len(frame) - 1))
            if self._too_many:
                break  # no more into libzmq's topics: the socket goes
        if n >= limit:
            self.flooded = f"more than {limit} frames sent upstream between two reads"
        elif self._too_many:
            self.flooded = (
                f"{self.topics} distinct topics ({self.topic_bytes} bytes) subscribed to "
                f"(a monitor subscribes to one, empty)"
            )

    @property
    def _too_many(self) -> bool:
        return self.topics > MAX_TOPICS or self.topic_bytes > MAX_TOPIC_BYTES

    def reset(self) -> None:
        """A fresh socket: nobody subscribes yet."""
        self.topics = self.topic_bytes = 0
        self.flooded = ""
