"""A run whose connection is lost (its agent or the relay it comes through died) says so, instead
of reading as an agent that went quiet."""

from __future__ import annotations

import time

import zmq

from stiffmon import protocol as p
from stiffmon.client import Client
from stiffmon.relay import Relay
from stiffmon.store import Store
from stiffmon.transport import free_port_pair
from tests.stiffmon.test_client_reconnect import HistoryAgent, settle

Ctx = zmq.Context[zmq.Socket[bytes]]


def _until(client: Client, want: bool, seconds: float = 10.0) -> dict[str, str]:
    """Poll until ``client.cut_off()`` is non-empty (``want``) or empty; return it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        client.poll(0.05)
        if bool(client.cut_off()) == want:
            break
    return client.cut_off()


def test_a_dead_agent_cuts_its_runs_off_until_they_are_heard_again(ctx: Ctx) -> None:
    """The address answering again (another run's agent took the port) does not restore the
    run: it stays cut off until a message of its own arrives (its agent came back)."""
    agent = HistoryAgent(ctx)
    with Client([agent.endpoint], snapshot_timeout=0.5) as client:
        assert settle(agent, client), "nothing from the agent"
        assert client.cut_off() == {}
        agent.pub.close(0)
        agent.router.close(0)
        assert _until(client, True) == {"r": agent.endpoint}
        again = ctx.socket(zmq.PUB)  # the same address comes back
        again.setsockopt(zmq.LINGER, 0)
        again.bind(agent.endpoint)
        try:
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:  # connected again, nothing from "r"
                client.poll(0.05)
                assert client.cut_off() == {"r": agent.endpoint}
            other = p.Scalars.from_dict({"loss": 1.0}, run="other", seq=0, step=0, t=1.0)
            again.send_multipart(p.encode(other))
            client.poll(0.3)
            assert client.cut_off() == {"r": agent.endpoint}  # another run: still cut off
            seq = len(agent.history)
            deadline = time.monotonic() + 10.0
            while client.cut_off() and time.monotonic() < deadline:  # its agent is back
                back = p.Scalars.from_dict({"loss": 1.0}, run="r", seq=seq, step=seq, t=1.0)
                again.send_multipart(p.encode(back))
                seq += 1
                client.poll(0.05)
            assert client.cut_off() == {}
        finally:
            again.close(0)


def test_a_dead_relay_cuts_off_every_run_behind_it(ctx: Ctx) -> None:
    agent = HistoryAgent(ctx)
    bind = f"tcp://127.0.0.1:{free_port_pair()}"
    relay = Relay([agent.endpoint], bind).start()
    try:
        with Client([bind], snapshot_timeout=0.5) as client:
            assert settle(agent, client), "nothing through the relay"
            relay.close()
            cut = _until(client, True)
    finally:
        relay.close()
    assert cut == {"r": bind}


def test_a_cut_off_run_in_words() -> None:
    st = Store()
    st.apply(p.Hello(run="r", seq=0, step=0, t=10.0, name="sgd"), now=0.0)
    rd = st.runs["r"]
    rd.cut_off = "tcp://10.0.0.5:5555"
    assert rd.health(now=1.0).text == "live"  # a message 1 s ago: not yet
    h = rd.health(now=15.0)
    assert (h.state, h.text) == ("stalled", "disconnected 15s (tcp://10.0.0.5:5555)")
    assert h.why == "connection to tcp://10.0.0.5:5555 lost" and h.level == "warning"
    h = rd.health(now=200.0)
    assert (h.state, h.text, h.level) == (
        "lost",
        "disconnected 3m (tcp://10.0.0.5:5555)",
        "error",
    )
    rd.cut_off = ""
    assert rd.health(now=15.0).text == "stalled 15s"
