"""A live client re-snapshots a real publisher while it streams: no step is lost or doubled.

Each run that appears makes the client ask every endpoint for a snapshot again (Clone pattern),
so a run already live is re-snapshotted while its batches are in flight. The history's chunks
(joined batches, and the measurements' values joined per name, whose ``seq`` ranges interleave)
must give the client exactly the batches it does not have yet.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import zmq

from stiffmon import protocol as p
from stiffmon.client import Client
from stiffmon.transport import Endpoint
from stiffmon_agent.columns import RawColumns
from stiffmon_agent.outgoing import Outgoing
from stiffmon_agent.publisher import Publisher
from tests.conftest import free_port_pair


@dataclass(frozen=True)
class _Split(Endpoint):
    """The run's snapshot port, but its updates from ``pub_at`` (the delaying proxy)."""

    pub_at: str = ""

    @property
    def pub(self) -> str:
        return self.pub_at


def _delay(source: str, out: zmq.Socket[bytes], seconds: float, stop: threading.Event) -> None:
    """Forward every update from ``source`` to ``out`` ``seconds`` late (a slow network path):
    a snapshot's end marker then overtakes the live batches published before it."""
    sub = out.context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(source)
    held: deque[tuple[float, list[bytes]]] = deque()
    try:
        while not stop.is_set():
            if sub.poll(2):
                while True:
                    try:
                        held.append((time.monotonic(), sub.recv_multipart(zmq.NOBLOCK)))
                    except zmq.Again:
                        break
            while held and time.monotonic() - held[0][0] >= seconds:
                out.send_multipart(held.popleft()[1])
    finally:
        sub.close(0)


def _stream(pub: Publisher, steps: int, stop: threading.Event) -> None:
    """Batches of 5 steps every ~2 ms, a measurement (scalars) every 40 steps."""
    for first in range(0, steps, 5):
        if stop.is_set():
            return
        rows = list(range(first, first + 5))
        raw = RawColumns(("loss",), [(s, time.time(), (float(s),)) for s in rows])
        pub.submit(Outgoing(p.Columns, rows[-1], time.time(), {"raw": raw}))
        if first % 40 == 0:
            fields = {"values_names": ["stiffness/mean"], "values_raw": [0.5]}
            pub.submit(Outgoing(p.Scalars, rows[-1], time.time(), fields))
        time.sleep(0.002)


def _beat(pub: Publisher, stop: threading.Event) -> None:
    """Another run: a message every 20 ms; the client's first sight of it re-snapshots all."""
    step = 0
    while not stop.is_set():
        fields = {"values_names": ["loss"], "values_raw": [1.0]}
        pub.submit(Outgoing(p.Scalars, step, time.time(), fields))
        step += 1
        time.sleep(0.02)


def test_re_snapshots_of_a_live_run_lose_and_double_nothing() -> None:
    steps = 12000
    # no heartbeats: they take seqs and are not kept, and the test counts every seq
    main = Publisher(
        "main", endpoint=f"tcp://127.0.0.1:{free_port_pair()}", heartbeat_interval=3600
    )
    main.batch_interval = 0.01
    main.start()
    others: list[Publisher] = []
    stop = threading.Event()
    assert main.endpoint is not None
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    out = ctx.socket(zmq.PUB)
    out.setsockopt(zmq.LINGER, 0)
    port = out.bind_to_random_port("tcp://127.0.0.1")
    delay = threading.Thread(target=_delay, args=(main.endpoint.pub, out, 0.15, stop), daemon=True)
    delay.start()
    split = _Split(main.endpoint.host, main.endpoint.port, f"tcp://127.0.0.1:{port}")
    client = Client([split], snapshot_timeout=5.0)
    got: list[p.AnyMessage] = []
    writer = threading.Thread(target=_stream, args=(main, steps, stop), daemon=True)
    try:
        deadline = time.monotonic() + 60
        writer.start()
        while writer.is_alive() or time.monotonic() < deadline - 55:
            got += [m for m, _ in client.poll(0.02)]
            if len(others) < 6 and main.seq > 350 * (len(others) + 1):
                # a new run appears: the client re-snapshots every endpoint, main included
                other = Publisher(
                    f"other{len(others)}", endpoint=f"tcp://127.0.0.1:{free_port_pair()}"
                )
                other.start()
                assert other.endpoint is not None
                others.append(other)
                client.add_endpoint(other.endpoint)
                beat = threading.Thread(target=_beat, args=(other, stop), daemon=True)
                beat.start()
            assert time.monotonic() < deadline
        end = time.monotonic() + 10
        while time.monotonic() < end:
            got += [m for m, _ in client.poll(0.05)]
            if any(m.run == "main" and m.step == steps - 1 for m in got):
                break
        served = main.snapshots_served
    finally:
        stop.set()
        client.close()
        delay.join(5)
        out.close(0)
        ctx.term()
        for pub in (main, *others):
            pub.close()
    mine = [m for m in got if m.run == "main"]
    # a snapshot joins messages into chunks, so count what was published: each batch's seq once
    seqs = [int(s) for m in mine for s in (m.batches()[0] if isinstance(m, p.Columns) else [m.seq])]
    assert len(seqs) == len(set(seqs)), "a published message delivered twice"
    assert set(seqs) == set(range(main.seq + 1)), "a published message never delivered"
    rows = p.expand_columns(mine)
    loss = [m.step for m in rows if isinstance(m, p.Scalars) and "loss" in m.names]
    assert loss == list(range(steps)), (
        f"{len(loss)} rows, first hole at {next((i for i, s in enumerate(loss) if s != i), None)}"
    )
    # the measurements, in the order they were published, each once
    measured = [m.step for m in rows if isinstance(m, p.Scalars) and "stiffness/mean" in m.names]
    assert measured == list(range(4, steps, 40))
    assert served >= 5  # the re-snapshots of main really happened while it was live
