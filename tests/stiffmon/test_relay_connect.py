"""A relay asked for a snapshot the moment it starts waits for its upstreams to connect.

Its snapshot sockets connect in the background (``ZMQ_IMMEDIATE``: an unconnected one refuses
the request); asked before the connection was made, the relay used to skip that upstream, and
a monitor attaching through a just-started relay saw the run only from the live stream on (the
suite's relay test once saw a run start at step 71 under load).
"""

from __future__ import annotations

import threading

import zmq

from stiffmon.relay import Relay
from stiffmon.transport import SNAPSHOT_DONE, free_port_pair, parse_endpoint


def test_an_upstream_that_connects_after_the_relay_is_asked_is_still_answered() -> None:
    upstream = f"tcp://127.0.0.1:{free_port_pair()}"
    relay = Relay([upstream], f"tcp://127.0.0.1:{free_port_pair()}")  # its sockets exist now
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVTIMEO, 5000)
    served: list[bool] = []

    def serve() -> None:
        threading.Event().wait(0.3)  # the upstream's snapshot port opens later
        router.bind(parse_endpoint(upstream).snapshot)
        try:
            ident, *_ = router.recv_multipart()
        except zmq.Again:
            return
        router.send_multipart([ident, SNAPSHOT_DONE])
        served.append(True)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        relay._gather([])  # a request at once, as from a monitor attaching to a new relay
        thread.join(10)
        assert served and not relay.dead  # waited for the connection, and it answered
    finally:
        relay.close()
        router.close(0)
        ctx.term()
