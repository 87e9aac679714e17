"""Monitor-side client: subscribe to live runs, back-fill their history, never crash on bad input.

Late join follows the ZeroMQ guide's Clone pattern (DESIGN §4): subscribe first, then ask each
endpoint's snapshot service for the history; :class:`~stiffmon.late_join.LateJoin` puts the
snapshot's and the live stream's messages in order, every run's once, in ``seq`` order. This
module owns the sockets: it polls them, asks for snapshots when the ordering wants one, and asks
again for a snapshot request left unanswered past the timeout.

An address whose peer sent a frame over the size limit is dropped by libzmq for good; the client
connects to it again (:mod:`stiffmon.reconnect`), says so in :attr:`ClientStats.warnings`, and asks
for a snapshot whenever a live connection comes back, so no message is lost from its view. An
address that is an ssh tunnel's local end (:mod:`stiffmon.tunnel`) passes on what the tunnel says
(ssh exited and why, up again) as warnings too.

An address added with ``reconnect=False`` (a run found in the local registry) is connected once:
the moment its connection is lost the client disconnects from it, before libzmq would connect to
whatever process takes the port next, and :meth:`Client.take_detached` names it; libzmq's own
retry of such an address waits :data:`ONCE_RECONNECT_MS`, so the client is always first.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import zmq

from stiffmon.late_join import ClientStats, LateJoin, Received
from stiffmon.reconnect import Links
from stiffmon.transport import (
    MAX_DATA_FRAME_BYTES,
    CurveKeys,
    Endpoint,
    limit_frames,
    parse_endpoint,
    snapshot_request,
)
from stiffmon.tunnel import take_tunnel_warnings, tunnel_label

__all__ = ["Client", "ClientStats", "Received"]

ONCE_RECONNECT_MS = 2000
"""``ZMQ_RECONNECT_IVL`` of the connections to an address added with ``reconnect=False``: how
long libzmq would wait before connecting again after losing it (the client disconnects from it
as soon as the loss is reported, within milliseconds; libzmq's default is 100 ms)."""


@dataclass
class _EndpointState:
    endpoint: Endpoint
    dealer: zmq.Socket[bytes]
    pending_since: float | None = None
    wanted: bool = True  # a snapshot should be requested as soon as possible
    last_request: float = 0.0
    reconnect: bool = True  # False: connected once, detached when the connection is lost
    drops: int = 0  # snapshot connections remade since the address last answered


def said_at(n: int) -> bool:
    """Whether the ``n``-th drop in a row of an address is said: 1, 2, 5, 10, 20, 50, 100, …
    (an address where nothing answers is remade every few seconds, and would fill the screen)."""
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n in (1, 2, 5)


class Client:
    """Subscribe to one or many agents (or relays) and yield their messages in order.

    Args:
        endpoints: ``tcp://host:port`` addresses (strings or :class:`Endpoint`).
        curve: Client CURVE keys, for agents that require authentication.
        snapshot_timeout: Seconds to wait for a snapshot (for its next frame, once it comes)
            before asking again.
        max_buffer: Live messages buffered per run while a snapshot is pending.
        max_seq_jump: A live message whose ``seq`` is further than this beyond what the client
            has of its run is malformed (forged or corrupt), not the run's new position: it is
            counted and dropped, and a snapshot, whose end marker is the authority on a run's
            ``seq``, is asked for in case the run really did move on.
        context: ZeroMQ context (default: a private one).
        accept: Which runs to take (default: all); the messages and history of any other run
            are dropped and counted in :attr:`ClientStats.foreign`.
    """

    def __init__(
        self,
        endpoints: Sequence[str | Endpoint],
        *,
        curve: CurveKeys | None = None,
        snapshot_timeout: float = 2.0,
        max_buffer: int = 100_000,
        max_seq_jump: int = 1_000_000,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        accept: Callable[[str], bool] | None = None,
    ) -> None:
        self._own_ctx = context is None
        self.ctx: zmq.Context[zmq.Socket[bytes]] = context or zmq.Context()
        self.curve = curve
        self.snapshot_timeout = snapshot_timeout
        self.stats = ClientStats()
        self._order: LateJoin[_EndpointState] = LateJoin(
            self.stats,
            lambda: self._eps.values(),
            max_buffer=max_buffer,
            max_seq_jump=max_seq_jump,
            accept=accept,
        )
        self._order.warn = self._warn  # a relay's answer that left runs out, said on screen
        self.sub = self._socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.RCVHWM, 100_000)
        self.poller = zmq.Poller()
        self.poller.register(self.sub, zmq.POLLIN)
        self._eps: dict[zmq.Socket[bytes], _EndpointState] = {}
        self._cut: dict[str, str] = {}  # run -> address lost, until the run itself is heard again
        self.said_bye: set[str] = set()  # runs whose bye came through
        self._detached: list[str] = []  # reconnect=False addresses lost, for take_detached()
        self._held: list[list[bytes]] = []  # read from the SUB before a disconnect, not ordered
        self._warned = self._taken = 0  # warnings made, handed out by take_warnings()
        try:
            self._links = Links(self.sub, self._warn, self._hold)
            self.poller.register(self._links.monitor, zmq.POLLIN)
            for ep in endpoints:
                self.add_endpoint(ep)
        except BaseException:
            self.close()  # a context left to the garbage collector with open sockets can hang
            raise

    def _socket(self, kind: int) -> zmq.Socket[bytes]:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        limit_frames(s, MAX_DATA_FRAME_BYTES)  # a bigger frame is refused before it is read
        if self.curve is not None:
            s.curve_secretkey = self.curve.secret
            s.curve_publickey = self.curve.public
            s.curve_serverkey = self.curve.server_public
        return s

    @property
    def max_buffer(self) -> int:
        """Live messages buffered per run while a snapshot is pending."""
        return self._order.max_buffer

    @max_buffer.setter
    def max_buffer(self, value: int) -> None:
        self._order.max_buffer = value

    @property
    def max_seq_jump(self) -> int:
        """The largest believed ``seq`` step beyond what the client has of a run."""
        return self._order.max_seq_jump

    @max_seq_jump.setter
    def max_seq_jump(self, value: int) -> None:
        self._order.max_seq_jump = value

    @property
    def endpoints(self) -> list[Endpoint]:
        return [st.endpoint for st in self._eps.values()]

    def add_endpoint(self, endpoint: str | Endpoint, *, reconnect: bool = True) -> Endpoint:
        """Connect to another agent or relay; its history is fetched.

        Args:
            endpoint: Its address.
            reconnect: False: connect once; when the connection is lost, disconnect from the
                address (:meth:`take_detached` names it) instead of connecting again to
                whatever listens there next.
        """
        ep = endpoint if isinstance(endpoint, Endpoint) else parse_endpoint(endpoint)
        self._links.add(ep.pub)
        with self._reconnect_interval(reconnect):  # libzmq copies it into the connection
            self.sub.connect(ep.pub)
        dealer = self._dealer(ep, reconnect)
        self._eps[dealer] = _EndpointState(ep, dealer, reconnect=reconnect)
        return ep

    @contextlib.contextmanager
    def _reconnect_interval(self, reconnect: bool) -> Iterator[None]:
        """Connections made inside wait :data:`ONCE_RECONNECT_MS` to retry when not
        ``reconnect`` (the socket's option is put back afterwards)."""
        if reconnect:
            yield
            return
        before = self.sub.getsockopt(zmq.RECONNECT_IVL)
        self.sub.setsockopt(zmq.RECONNECT_IVL, ONCE_RECONNECT_MS)
        try:
            yield
        finally:
            self.sub.setsockopt(zmq.RECONNECT_IVL, before)

    def _dealer(self, ep: Endpoint, reconnect: bool = True) -> zmq.Socket[bytes]:
        dealer = self._socket(zmq.DEALER)
        if not reconnect:
            dealer.setsockopt(zmq.RECONNECT_IVL, ONCE_RECONNECT_MS)
        dealer.connect(ep.snapshot)
        self.poller.register(dealer, zmq.POLLIN)
        return dealer

    def remove_endpoint(self, endpoint: str | Endpoint) -> None:
        """Disconnect from an address and forget it. Its runs stay known, with the order they
        reached (what it had sent before may still come)."""
        ep = endpoint if isinstance(endpoint, Endpoint) else parse_endpoint(endpoint)
        for st in [st for st in self._eps.values() if st.endpoint == ep]:
            self.poller.unregister(st.dealer)
            del self._eps[st.dealer]
            st.dealer.close(0)
        self._hold()
        with contextlib.suppress(zmq.ZMQError):  # not connected (any more)
            self.sub.disconnect(ep.pub)
        self._links.remove(ep.pub)

    def _hold(self) -> None:
        """Read what the SUB socket has (ordered at the next chance): a poll reads the next
        message's first frame ahead, and libzmq aborts (``!_more``, fq.cpp) when the rest of it
        is then cut off by disconnecting the address it comes from."""
        while True:
            try:
                self._held.append(self.sub.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return

    def _order_held(self, out: list[Received]) -> None:
        held, self._held = self._held, []
        for frames in held:
            self._order.on_live(frames, out)

    def take_detached(self) -> list[str]:
        """The addresses added with ``reconnect=False`` whose connection was lost since the last
        call: the client has disconnected from them and forgotten them."""
        out, self._detached = self._detached, []
        return out

    def _new_dealer(self, st: _EndpointState) -> None:
        """A fresh snapshot socket for ``st`` (libzmq gave the old one's connection up)."""
        self.poller.unregister(st.dealer)
        del self._eps[st.dealer]
        st.dealer.close(0)
        st.dealer = self._dealer(st.endpoint, st.reconnect)
        self._eps[st.dealer] = st
        st.pending_since = None
        self.stats.reconnects += 1
        st.drops += 1
        if st.drops == 1:
            self._warn(f"{st.endpoint.snapshot} dropped the snapshot connection; reconnecting")
        elif said_at(st.drops):  # the 2nd, 5th, 10th, 20th, … time in a row: nothing answers
            self._warn(
                f"{st.endpoint.snapshot} dropped the snapshot connection again ({st.drops} times,"
                " no answer since: not a stiffmon agent or relay?); reconnecting"
            )

    def _warn(self, text: str) -> None:
        self.stats.last_error = text
        self.stats.warnings.append(text)
        self._warned += 1

    def take_warnings(self) -> list[str]:
        """The warnings (connections dropped and made again) since the last call, oldest first
        (at most the last 20)."""
        kept = list(self.stats.warnings)
        new, self._taken = min(self._warned - self._taken, len(kept)), self._warned
        return kept[len(kept) - new :]

    # ------------------------------------------------------------------ snapshots

    def _request(self, st: _EndpointState, now: float) -> None:
        try:
            st.dealer.send_multipart(snapshot_request(), zmq.NOBLOCK)
        except zmq.Again:  # no connection left: libzmq dropped it (an oversized frame?)
            st.last_request = now
            self._new_dealer(st)
            return
        except zmq.ZMQError as exc:
            self.stats.last_error = f"snapshot request to {st.endpoint}: {exc}"
            return
        st.pending_since = now
        st.wanted = False
        st.last_request = now

    # ------------------------------------------------------------------ public API

    def poll(self, timeout: float = 0.1, max_messages: int = 10_000) -> list[Received]:
        """Wait up to ``timeout`` seconds; return the messages that became available, in order."""
        out: list[Received] = []
        now = time.monotonic()
        self._check_links(now)
        self._order_held(out)
        for st in list(self._eps.values()):
            late = st.pending_since is not None and now - st.pending_since > self.snapshot_timeout
            if late and not int(st.dealer.get(zmq.EVENTS)) & zmq.POLLIN:  # none waits unread
                st.pending_since = None
                self.stats.snapshot_timeouts += 1
                # the agent may have died with our request: ask again while runs wait for one
                st.wanted = self._order.syncing()
                self._order.release_stuck(out)
            if st.wanted and st.pending_since is None and now - st.last_request >= 0.5:
                self._request(st, now)
        deadline = now + max(timeout, 0.0)
        while len(out) < max_messages:
            now = time.monotonic()
            remaining = min(max(0.0, deadline - now), self._links.wait(now))
            events = dict(self.poller.poll(int(remaining * 1000) if not out else 0))
            if self._links.monitor in events or self._links.wait(time.monotonic()) == 0.0:
                self._check_links(time.monotonic())
                self._order_held(out)
                events.pop(self._links.monitor, None)
            elif not events:
                break
            for sock in events:
                if sock is not self.sub and sock not in self._eps:  # detached meanwhile
                    continue
                for _ in range(1000):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if sock is self.sub:
                        self._order.on_live(frames, out)
                    else:
                        self._eps[sock].drops = 0  # it answers: a later drop is news again
                        self._order.on_snapshot(self._eps[sock], frames, out)
                answering = self._eps.get(sock)
                if answering is not None and answering.pending_since is not None:
                    answering.pending_since = time.monotonic()  # still coming: not late
        for st in self._eps.values():  # an ssh tunnel's news: ssh exited, up again, port taken
            for text in take_tunnel_warnings(st.endpoint.pub):
                self._warn(text)
        for msg, _ in out:
            if self._cut:
                self._cut.pop(msg.run, None)
            if msg.KIND == "bye":
                self.said_bye.add(msg.run)
        return out

    def _check_links(self, now: float) -> None:
        """Connect again what libzmq gave up; a snapshot for each live connection that came back."""
        back = self._links.read(now)
        down = self._links.down()
        for st in [st for st in self._eps.values() if not st.reconnect]:
            if st.endpoint.pub in down:  # before libzmq connects to whatever has the port now
                self.remove_endpoint(st.endpoint)
                self._detached.append(st.endpoint.pub)
        again = self._links.tick(now)
        self.stats.reconnects += len(again)
        for st in self._eps.values():
            if st.endpoint.pub in back:
                st.wanted = True

    def cut_off(self) -> dict[str, str]:
        """Runs whose address (agent or relay) lost its connection and that have not been heard
        since: run -> address (an ssh tunnel's: its ``ssh://`` source, with why while its ssh is
        down). The address answering again is not enough: a killed agent's port may be taken by
        another run's agent. A run that said bye is not cut off: it ended."""
        if down := self._links.down():
            for r, st in self._order.run_source.items():
                if st.endpoint.pub in down and r not in self.said_bye:
                    self._cut[r] = st.endpoint.pub
        return {r: tunnel_label(a) for r, a in self._cut.items()}

    def flush_pending(self) -> list[Received]:
        """Give up waiting for snapshots: return every buffered message, per run in seq order."""
        return self._order.flush_pending()

    def close(self) -> None:
        """Close the sockets (and the context if it is ours)."""
        if hasattr(self, "_links"):
            self._links.close()
        self.sub.close(0)
        for st in self._eps.values():
            st.dealer.close(0)
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
