"""The monitor side against hostile peers: huge frames, out-of-range and forged messages, relays."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import zmq

from stiffmon import protocol as p
from stiffmon.client import Client
from stiffmon.relay import Relay
from stiffmon.store import Store
from stiffmon.transport import (
    SNAPSHOT_DONE,
    SNAPSHOT_REQUEST,
    encode_control,
    free_port_pair,
    load_curve_client,
    load_curve_server,
    make_keys,
    parse_endpoint,
)
from stiffmon.tui.sources import LiveSource
from tests.hostile import GIB, Listener, PeakRss, attack_connect

MB = 1 << 20
Ctx = zmq.Context[zmq.Socket[bytes]]


def _bye(run: str, seq: int, step: int = 0) -> list[bytes]:
    return p.encode(p.Bye(run=run, seq=seq, step=step, t=1.0, reason="x"))


def _scalars(run: str, seq: int, step: int) -> list[bytes]:
    return p.encode(p.Scalars.from_dict({"loss": 1.0}, run=run, seq=seq, step=step, t=1.0))


# ------------------------------------------------------------------ huge frames


def test_the_attack_itself_costs_a_socket_without_a_limit(ctx: Ctx) -> None:
    """Control: the measurement sees a big frame arrive where nothing refuses it."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    listener = Listener("PUB", 256 * MB)
    with PeakRss() as rss:
        sub.connect(f"tcp://127.0.0.1:{listener.port}")
        took = listener.wait()
    sub.close(0)
    assert took == 256 * MB and rss.growth >= 200 * MB


def test_a_1_gib_frame_costs_a_monitor_nothing() -> None:
    port = free_port_pair()
    pub, router = Listener("PUB", GIB, port), Listener("ROUTER", GIB, port + 1)
    with PeakRss() as rss, Client([f"tcp://127.0.0.1:{port}"], snapshot_timeout=0.5) as client:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (not pub.sent or not router.sent):
            client.poll(0.1)
        took = (pub.wait(), router.wait())
    assert all(0 <= t < 64 * MB for t in took), took  # both refused after the header
    assert rss.growth <= 64 * MB, f"RSS grew by {rss.growth / MB:.0f} MB"
    print(f"1 GiB frames to SUB and DEALER: monitor RSS +{rss.growth / MB:.1f} MB")


def test_a_1_gib_frame_costs_a_relay_nothing(ctx: Ctx) -> None:
    up = free_port_pair()
    pub, router = Listener("PUB", GIB, up), Listener("ROUTER", GIB, up + 1)
    bind = parse_endpoint(f"tcp://127.0.0.1:{free_port_pair()}")
    with PeakRss() as rss, Relay([f"tcp://127.0.0.1:{up}"], str(bind), snapshot_timeout=1).start():
        asker = ctx.socket(zmq.DEALER)
        asker.connect(bind.snapshot)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not router.sent:  # its upstream DEALER
            asker.send_multipart(encode_control(SNAPSHOT_REQUEST, {"v": 1}))
            time.sleep(0.2)
        took = [pub.wait(), router.wait()]  # its XSUB and its upstream DEALER
        took.append(attack_connect(bind.host, bind.port + 1, "DEALER", GIB))  # its ROUTER
        took.append(attack_connect(bind.host, bind.port, "SUB", GIB))  # its XPUB
        asker.close(0)
    assert all(0 <= t < 64 * MB for t in took), took
    assert rss.growth <= 64 * MB, f"RSS grew by {rss.growth / MB:.0f} MB"
    print(f"1 GiB frames to XSUB, DEALER, ROUTER, XPUB: relay RSS +{rss.growth / MB:.1f} MB")


# ------------------------------------------------------------------ out-of-range and forged


def test_step_2_63_is_malformed_and_the_live_monitor_goes_on(ctx: Ctx) -> None:
    port = free_port_pair()
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{port}")
    router = ctx.socket(zmq.ROUTER)  # a snapshot service with an empty history
    router.bind(f"tcp://127.0.0.1:{port + 1}")

    def answer() -> None:
        while router.poll(0):
            ident, *_ = router.recv_multipart()
            router.send_multipart([ident, *encode_control(SNAPSHOT_DONE, {})])

    source = LiveSource([f"tcp://127.0.0.1:{port}"])
    worker = threading.Thread(target=source.run, daemon=True)
    worker.start()
    store = Store()
    try:
        good = _scalars("r", 0, 5)
        forged = [good[0], good[1].replace(b'"step": 5', b'"step": 9223372036854775808'), good[2]]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and source.malformed < 1:
            answer()
            pub.send_multipart(forged)
            time.sleep(0.05)
            store.extend(source.drain())
            store.malformed = source.malformed
        assert store.malformed >= 1 and worker.is_alive()
        for seq in range(3):
            pub.send_multipart(_scalars("r", seq, 10 + seq))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "r" not in store.runs:
            answer()
            store.extend(source.drain())
            time.sleep(0.05)
        assert store.runs["r"].scalars["loss"].steps.tolist() == [10, 11, 12]
    finally:
        source.stop.set()
        worker.join(5)
        pub.close(0)
        router.close(0)


def test_store_counts_what_it_cannot_apply() -> None:
    store = Store()
    bad = p.Scalars(run="r", seq=0, step=2**63, t=0.0, names=("a",), values=[1.0])
    store.apply(bad)  # built directly, not decoded: the store still does not raise
    store.apply(p.Bye(run="r", seq=1, step=1, t=0.0, reason="x"))
    assert store.rejected == 1 and store.malformed == 1 and store.runs["r"].finished
    store.malformed = 5  # a source reports its own count
    assert store.malformed == 6


def test_a_forged_seq_does_not_silence_a_genuine_run(ctx: Ctx) -> None:
    """A rogue publisher claims seq 10^15 for a genuine run; the run's messages still come."""
    from stiffmon_agent.outgoing import Outgoing
    from stiffmon_agent.publisher import Publisher

    genuine = Publisher("gen", endpoint=f"tcp://127.0.0.1:{free_port_pair()}")
    genuine.start()
    rogue_port = free_port_pair()
    rogue = ctx.socket(zmq.PUB)
    rogue.bind(f"tcp://127.0.0.1:{rogue_port}")
    assert genuine.endpoint is not None
    client = Client([genuine.endpoint, f"tcp://127.0.0.1:{rogue_port}"], snapshot_timeout=0.5)

    def submit(step: int) -> None:
        genuine.submit(
            Outgoing(p.Scalars, step, time.time(), {"values_names": ["loss"], "values_raw": [1]})
        )

    got: list[p.AnyMessage] = []
    try:
        for step in range(5):
            submit(step)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(_rows(got)) < 5:
            got += [m for m, _ in client.poll(0.1)]
        for _ in range(5):
            rogue.send_multipart(_bye("gen", 10**15))
            got += [m for m, _ in client.poll(0.1)]
        for step in range(5, 10):
            submit(step)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(_rows(got)) < 10:
            got += [m for m, _ in client.poll(0.1)]
    finally:
        client.close()
        genuine.close(2)
        rogue.close(0)
    assert [m.step for m in _rows(got)] == list(range(10))
    assert not any(m.kind == "bye" for m in got) and client.stats.malformed >= 1


def _rows(got: list[p.AnyMessage]) -> list[p.AnyMessage]:
    """The scalars, live or joined into a snapshot's columns, one message per row."""
    return [m for m in p.expand_columns(got) if m.kind == "scalars"]


# ------------------------------------------------------------------ relay


def _hung_upstreams(ctx: Ctx, n: int) -> tuple[list[str], list[zmq.Socket[bytes]]]:
    """Agents that accept connections and never answer (a stopped process, say)."""
    eps, socks = [], []
    for _ in range(n):
        port = free_port_pair()
        for kind, q in ((zmq.PUB, port), (zmq.ROUTER, port + 1)):
            s = ctx.socket(kind)
            s.setsockopt(zmq.LINGER, 0)
            s.bind(f"tcp://127.0.0.1:{q}")
            socks.append(s)
        eps.append(f"tcp://127.0.0.1:{port}")
    return eps, socks


def _ask(ctx: Ctx, ep: str, timeout: float = 30.0) -> tuple[float, int]:
    """Seconds until the relay's done marker, and the snapshot messages before it."""
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(parse_endpoint(ep).snapshot)
    t0 = time.monotonic()
    d.send_multipart(encode_control(SNAPSHOT_REQUEST, {"v": 1}))
    n = 0
    try:
        while time.monotonic() - t0 < timeout:
            if d.poll(100):
                frames = d.recv_multipart()
                if frames[0] == SNAPSHOT_DONE:
                    return time.monotonic() - t0, n
                n += 1
        raise AssertionError("no answer")
    finally:
        d.close(0)


def test_relay_asks_upstreams_at_once_and_skips_dead_ones(ctx: Ctx) -> None:
    from stiffmon_agent.outgoing import Outgoing
    from stiffmon_agent.publisher import Publisher

    live = [Publisher(f"run{i}", endpoint=f"tcp://127.0.0.1:{free_port_pair()}") for i in (0, 1)]
    for pub in live:
        pub.start()
        pub.submit(Outgoing(p.Bye, 0, time.time(), {"reason": "x"}))
    dead = [f"tcp://127.0.0.1:{free_port_pair()}" for _ in range(10)]  # nobody there
    hung, hung_sockets = _hung_upstreams(ctx, 10)
    bind = f"tcp://127.0.0.1:{free_port_pair()}"
    upstream = [str(pub.endpoint) for pub in live] + dead + hung
    try:
        with Relay(upstream, bind, snapshot_timeout=2.0).start() as relay:
            time.sleep(0.5)  # connections come up
            first, n1 = _ask(ctx, bind)
            # then the dead and hung ones are known: the better of two asks (one may meet a
            # loaded machine's hiccup in a live publisher's answer; a relay that waits for
            # the known-dead ones again takes the full timeout in both)
            second, n2 = min(_ask(ctx, bind), _ask(ctx, bind))
            results: list[tuple[float, int]] = []
            askers = [
                threading.Thread(target=lambda: results.append(_ask(ctx, bind))) for _ in range(6)
            ]
            before = relay.gatherings
            for t in askers:
                t.start()
            for t in askers:
                t.join(30)
            coalesced = relay.gatherings - before
    finally:
        for pub in live:
            pub.close(2)
        for sock in hung_sockets:
            sock.close(0)
    print(f"relay, 2 live + 20 dead/hung upstreams: {first:.2f} s, then {second:.2f} s")
    assert n1 >= 4 and n2 >= 4  # 2 runs × (message, end marker): both live ones answered
    assert first <= 2.0 + 1.0  # one timeout for all 20 bad upstreams, not one each
    assert second <= 1.0  # then the dead and hung ones are not waited for
    assert len(results) == 6 and all(n >= 4 for _, n in results)
    assert coalesced <= 3  # six concurrent requests, answered by a couple of gatherings


def test_relay_curve_both_sides_and_exposure_warning(tmp_path: Path) -> None:
    from stiffmon_agent.outgoing import Outgoing
    from stiffmon_agent.publisher import Publisher

    keys = make_keys(tmp_path / "keys", ("client",))
    agent = Publisher(
        "sec", endpoint=f"tcp://127.0.0.1:{free_port_pair()}", curve=load_curve_server(keys)
    )
    agent.start()
    agent.submit(Outgoing(p.Bye, 0, time.time(), {"reason": "x"}))
    client_keys = load_curve_client(keys)
    warnings: list[str] = []
    bind = f"tcp://0.0.0.0:{free_port_pair()}"
    local = bind.replace("0.0.0.0", "127.0.0.1")
    try:
        with Relay(
            [str(agent.endpoint)],
            bind,
            curve_upstream=client_keys,
            curve_bind=load_curve_server(keys),
            warn=warnings.append,
        ).start():
            assert warnings == []  # CURVE on the bind side: no exposure warning
            with Client([local], curve=client_keys) as good, Client([local]) as plain:
                got: list[p.AnyMessage] = []
                leaked: list[p.AnyMessage] = []
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and not any(m.kind == "bye" for m in got):
                    got += [m for m, _ in good.poll(0.1)]
                    leaked += [m for m, _ in plain.poll(0.05)]
                assert any(m.kind == "bye" and m.run == "sec" for m in got)
                assert leaked == []
        with Relay(
            [str(agent.endpoint)], f"tcp://0.0.0.0:{free_port_pair()}", warn=warnings.append
        ):
            pass
        assert any("not loopback" in w for w in warnings)
    finally:
        agent.close(2)


# ------------------------------------------------------------------ files


def test_summary_and_replay_skip_a_forged_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stiffmon.cli import main
    from stiffmon.session import SessionWriter
    from stiffmon.tui.sources import ReplaySource

    path = tmp_path / "f.stiff"
    good = _scalars("r", 0, 5)
    with SessionWriter(path) as w:
        w.write_frames(good)
        w.write_frames(
            [good[0], good[1].replace(b'"step": 5', b'"step": 18446744073709551616'), good[2]]
        )
        w.write_frames(_scalars("r", 1, p.MAX_INT))
        w.write(p.Heartbeat(run="r", seq=2, step=p.MAX_INT, t=1.0, last_seq=1, dropped=3))
        w.write_frames(_bye("r", 3, p.MAX_INT))
    assert main(["summary", "--json", str(path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["run"] == "r" and rows[0]["status"] == "finished" and rows[0]["dropped"] == 3
    assert main(["summary", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "dropped 3 messages" in out and "skipped 1 malformed" in out
    source = ReplaySource([path])
    source.load()
    assert source.skipped == 1 and len(source.messages) == 4


# ------------------------------------------------------------------ nothing left to the collector


def test_a_client_or_relay_that_fails_to_start_leaves_no_context_open(ctx: Ctx) -> None:
    """A context left to the garbage collector with open sockets can hang the process (in
    ``zmq_ctx_term``); a constructor that fails part-way closes what it opened."""
    import gc

    from tests import conftest

    busy = ctx.socket(zmq.XPUB)
    port = free_port_pair()
    busy.bind(f"tcp://127.0.0.1:{port}")  # the relay's bind below fails on it
    with pytest.raises(ValueError):
        Client([f"tcp://127.0.0.1:{free_port_pair()}", "tcp://127.0.0.1:notaport"])
    with pytest.raises(zmq.ZMQError):
        Relay([f"tcp://127.0.0.1:{free_port_pair()}"], f"tcp://127.0.0.1:{port}")
    gc.collect()
    leaks, conftest._ZMQ_LEAKS[:] = conftest._ZMQ_LEAKS[:], []
    busy.close(0)
    assert leaks == []
