"""End-to-end transport: agents in subprocesses, the monitor client in the test, real sockets."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stiffmon import protocol as p
from stiffmon.client import Client
from stiffmon.relay import Relay
from stiffmon.session import read_session
from stiffmon.transport import load_curve_client, make_keys
from tests.conftest import Procs, free_port_pair

Msgs = list[p.AnyMessage]


def collect(
    client: Client, until: Callable[[Msgs], bool], timeout: float = 30.0, into: Msgs | None = None
) -> Msgs:
    got: Msgs = [] if into is None else into
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got += [m for m, _ in client.poll(0.1)]
        if until(got):
            return got
    raise AssertionError(f"timed out; got {len(got)} messages: {sorted({m.kind for m in got})}")


def wait_ready(proc: subprocess.Popen[str]) -> tuple[str, str]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        raise AssertionError(
            f"agent did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}"
        )
    _, ep, run = line.split()
    return ep, run


def per_run_seqs(msgs: Msgs, run: str) -> list[int]:
    return [m.seq for m in msgs if m.run == run]


def has_bye(run: str) -> Callable[[Msgs], bool]:
    return lambda ms: any(m.kind == "bye" and m.run == run for m in ms)


def test_live_stream_end_to_end(procs: Procs, endpoint: str) -> None:
    client = Client([endpoint])
    try:
        proc = procs.start(
            "-m",
            "tests.agent.train_script",
            "--endpoint",
            endpoint,
            "--steps",
            "40",
            "--delay",
            "0.05",
        )
        _, run = wait_ready(proc)
        msgs = collect(client, has_bye(run))
    finally:
        client.close()
    mine = [m for m in msgs if m.run == run]
    kinds = {m.kind for m in mine}
    assert {"hello", "scalars", "matrix", "curve", "spectrum", "bye"} <= kinds
    # A snapshot may answer the early join, in first-seq order: a columns message joins batches
    # (its seq is the last one's), sparse columns (one per name) share a scalars message's seq.
    # Every batch of every name arrives once, the other messages in seq order ...
    units: list[tuple[int, str]] = []
    others: list[int] = []
    for m in mine:
        if isinstance(m, p.Columns):
            seqs, _ = m.batches()
            units += [(int(q), name) for q in seqs for name in m.names]
        elif m.kind != "heartbeat":
            others.append(m.seq)
            units.append((m.seq, m.kind))
    assert others == sorted(others)
    assert len(units) == len(set(units))
    # ... and no logged value twice.
    values = [
        (m.step, name)
        for m in p.expand_columns(mine)
        if isinstance(m, p.Scalars)
        for name in m.names
    ]
    assert len(values) == len(set(values))
    steps = [
        m.step for m in p.expand_columns(mine) if isinstance(m, p.Scalars) and "loss" in m.names
    ]
    assert steps == list(range(40))  # every step, once, in order
    hello = next(m for m in mine if isinstance(m, p.Hello))
    assert hello.name == "script" and hello.optimizer["type"] == "SGD" and hello.probe_train == 15
    assert any(isinstance(m, p.Matrix) and m.name == "stiffness/cos/train-val" for m in mine)
    assert client.stats.malformed == 0


def test_late_join_gets_the_full_history(procs: Procs, endpoint: str, tmp_path: Path) -> None:
    rec = tmp_path / "run.stiff"
    proc = procs.start(
        "-m",
        "tests.agent.train_script",
        "--endpoint",
        endpoint,
        "--steps",
        "60",
        "--record",
        str(rec),
        "--no-close",
        "--forever",
        "--delay",
        "0.01",
    )
    _, run = wait_ready(proc)
    time.sleep(2.0)  # the run is well under way before anyone watches
    client = Client([endpoint])
    try:
        # A history chunk's step is its last row's, so a step >= 150 can arrive inside the
        # snapshot, before the measurements that follow it in first-seq order: wait for the end.
        msgs = collect(
            client,
            lambda ms: (
                client.stats.snapshots >= 1
                and any(m.kind in p.PER_STEP_KINDS and m.step >= 150 for m in ms)
            ),
        )
    finally:
        client.close()
    mine = [m for m in msgs if m.run == run and m.kind != "heartbeat"]
    assert mine[0].kind == "hello" and mine[0].seq == 0
    loss_steps = [
        m.step for m in p.expand_columns(mine) if isinstance(m, p.Scalars) and "loss" in m.names
    ]
    assert loss_steps[:50] == list(range(50))  # from the snapshot
    assert loss_steps == sorted(loss_steps) and len(set(loss_steps)) == len(loss_steps)
    assert loss_steps[-1] >= 150  # and live after it, without a hole
    assert loss_steps == list(range(loss_steps[-1] + 1))
    assert any(m.kind == "matrix" and m.step == 0 for m in mine)


def test_agent_restart_and_monitor_restart(procs: Procs, endpoint: str) -> None:
    client = Client([endpoint])
    try:
        first = procs.start(
            # long enough (2 s) for the monitor to be connected before the run ends
            "-m",
            "tests.agent.train_script",
            "--endpoint",
            endpoint,
            "--steps",
            "40",
            "--delay",
            "0.05",
        )
        _, run1 = wait_ready(first)
        msgs = collect(client, has_bye(run1))
        first.wait(20)
        second = procs.start(
            "-m",
            "tests.agent.train_script",
            "--endpoint",
            endpoint,
            "--steps",
            "1500",  # alive while a second monitor attaches, even under load
            "--delay",
            "0.01",
        )
        _, run2 = wait_ready(second)
        assert run2 != run1
        collect(
            client,
            lambda ms: any(
                m.run == run2 and m.kind in p.PER_STEP_KINDS and m.step > 30 for m in ms
            ),
            into=msgs,
        )
    finally:
        client.close()
    run2_msgs = [m for m in msgs if m.run == run2 and m.kind != "heartbeat"]
    assert run2_msgs[0].kind == "hello"  # the new run's history came first
    # a monitor that restarts gets everything again
    again = Client([endpoint])
    try:
        msgs2 = collect(
            again,
            lambda ms: (
                any(m.run == run2 and m.kind == "hello" for m in ms)
                and any(m.run == run2 and m.kind in p.PER_STEP_KINDS and m.step > 60 for m in ms)
            ),
        )
    finally:
        again.close()
    steps = [
        m.step
        for m in p.expand_columns(msgs2)
        if m.run == run2 and isinstance(m, p.Scalars) and "loss" in m.names
    ]
    assert steps[0] == 0 and steps == list(range(steps[-1] + 1))


def test_sigkill_leaves_a_readable_session(procs: Procs, tmp_path: Path) -> None:
    rec = tmp_path / "killed.stiff"
    proc = procs.start(
        "-m", "tests.agent.train_script", "--record", str(rec), "--forever", "--every", "5"
    )
    wait_ready(proc)
    time.sleep(2.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    msgs, scan = read_session(rec)
    assert msgs and msgs[0].kind == "hello"
    assert any(m.kind == "matrix" for m in msgs)
    steps = [
        m.step for m in p.expand_columns(msgs) if isinstance(m, p.Scalars) and "loss" in m.names
    ]
    assert steps == list(range(len(steps))) and len(steps) > 10
    assert scan.state in ("clean", "truncated")


def test_sigint_exits_cleanly_and_says_bye(procs: Procs, tmp_path: Path, _registry: Path) -> None:
    rec = tmp_path / "int.stiff"
    proc = procs.start(
        "-m", "tests.agent.train_script", "--record", str(rec), "--forever", "--delay", "0.01"
    )
    wait_ready(proc)
    time.sleep(1.0)
    assert list(_registry.glob("*.json"))
    proc.send_signal(signal.SIGINT)
    proc.wait(20)
    assert proc.returncode != 0  # KeyboardInterrupt in the user's loop
    msgs, scan = read_session(rec)
    assert scan.state == "clean" and msgs[-1].kind == "bye" and isinstance(msgs[-1], p.Bye)
    assert msgs[-1].reason == "interrupted"  # Ctrl-C, as the monitor then says
    assert not list(_registry.glob("*.json"))  # removed on exit


def test_rogue_publisher_frames_are_rejected(endpoint: str) -> None:
    import zmq

    from stiffmon.transport import parse_endpoint

    ep = parse_endpoint(endpoint)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(ep.pub)
    client = Client([endpoint], snapshot_timeout=0.5)
    try:
        time.sleep(0.3)
        good = p.encode(p.Hello(run="rogue", seq=0, step=0, t=0.0, name="ok"))
        bad = [
            [b"x"],
            [b"rogue/hello", b"{not json"],
            [b"rogue/scalars", b'{"v": 99}'],
            [good[0], good[1].replace(b'"seq": 0', b'"seq": -4')],
            [b"\xff" * 10, b"\x00" * 100, b"junk"],
        ]
        deadline = time.monotonic() + 10
        got: Msgs = []
        while time.monotonic() < deadline and client.stats.malformed < len(bad):
            for frames in bad:
                pub.send_multipart(frames)
            got += [m for m, _ in client.poll(0.2)]
        assert client.stats.malformed >= len(bad)
        pub.send_multipart(good)
        got += [m for m, _ in client.poll(1.0)]
        assert client.stats.malformed >= len(bad)
    finally:
        client.close()
        pub.close(0)
        ctx.term()


def test_curve_unauthorised_client_gets_nothing(
    procs: Procs, endpoint: str, tmp_path: Path
) -> None:
    keys = make_keys(tmp_path / "keys", ("alice",))
    stranger = make_keys(tmp_path / "other", ("mallory",))
    proc = procs.start(
        "-m",
        "tests.agent.train_script",
        "--endpoint",
        endpoint,
        "--curve-keys",
        str(keys),
        "--forever",
        "--delay",
        "0.01",
    )
    _, run = wait_ready(proc)
    good = Client([endpoint], curve=load_curve_client(keys, "alice"))
    # mallory knows the server's public key but is not authorised
    mallory_keys = load_curve_client(stranger, "mallory")
    mallory_keys = type(mallory_keys)(
        mallory_keys.public,
        mallory_keys.secret,
        server_public=load_curve_client(keys, "alice").server_public,
    )
    bad = Client([endpoint], curve=mallory_keys, snapshot_timeout=1.0)
    plain = Client([endpoint], snapshot_timeout=1.0)
    try:
        msgs = collect(good, lambda ms: any(m.kind in p.PER_STEP_KINDS for m in ms))
        assert any(m.run == run for m in msgs)
        deadline = time.monotonic() + 10  # live too, not only the snapshot: the PUB's handshake
        while time.monotonic() < deadline and good.stats.received == 0:
            good.poll(0.1)
        assert good.stats.received > 0
        deadline = time.monotonic() + 3
        leaked: Msgs = []
        while time.monotonic() < deadline:
            leaked += [m for m, _ in bad.poll(0.1)] + [m for m, _ in plain.poll(0.1)]
        assert leaked == []
    finally:
        for c in (good, bad, plain):
            c.close()


def test_relay_fans_in_two_agents(procs: Procs) -> None:
    a, b = (f"tcp://127.0.0.1:{free_port_pair()}" for _ in range(2))
    pa = procs.start(
        "-m", "tests.agent.train_script", "--endpoint", a, "--forever", "--delay", "0.02"
    )
    _, run_a = wait_ready(pa)
    time.sleep(0.2)
    pb = procs.start(
        "-m", "tests.agent.train_script", "--endpoint", b, "--forever", "--delay", "0.02"
    )
    _, run_b = wait_ready(pb)
    time.sleep(1.0)
    relay_ep = f"tcp://127.0.0.1:{free_port_pair()}"
    with Relay([a, b], relay_ep).start():
        client = Client([relay_ep])
        try:
            msgs = collect(
                client,
                lambda ms: all(
                    any(m.run == r and m.kind in p.PER_STEP_KINDS and m.step > 80 for m in ms)
                    for r in (run_a, run_b)
                ),
            )
        finally:
            client.close()
    for run in (run_a, run_b):
        steps = [
            m.step
            for m in p.expand_columns(msgs)
            if m.run == run and isinstance(m, p.Scalars) and "loss" in m.names
        ]
        assert steps[0] == 0 and steps == list(range(steps[-1] + 1))  # snapshot through the relay
        assert any(m.run == run and m.kind == "hello" for m in msgs)


def test_record_command_survives_an_agent_restart(
    procs: Procs, endpoint: str, tmp_path: Path
) -> None:
    out = tmp_path / "rec.stiff"
    rec = procs.start("-m", "stiffmon", "record", endpoint, "-o", str(out), "--duration", "120")
    deadline = time.monotonic() + 60  # the file is made once the recorder's client is connected
    while not out.exists() and rec.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out.exists(), "stiffmon record did not start"
    first = procs.start(
        "-m", "tests.agent.train_script", "--endpoint", endpoint, "--steps", "30", "--delay", "0.05"
    )
    _, run1 = wait_ready(first)
    first.wait(30)
    second = procs.start(
        "-m", "tests.agent.train_script", "--endpoint", endpoint, "--steps", "30", "--delay", "0.05"
    )
    _, run2 = wait_ready(second)
    second.wait(30)
    deadline = time.monotonic() + 20  # until the recorder has written both runs' bye
    while time.monotonic() < deadline:
        done = {m.run for m in read_session(out)[0] if m.kind == "bye"}
        if {run1, run2} <= done:
            break
        time.sleep(0.2)
    rec.send_signal(signal.SIGINT)
    rec.wait(30)
    msgs, scan = read_session(out)
    assert scan.state == "clean"
    for run in (run1, run2):
        mine = [m for m in msgs if m.run == run]
        seen = {m.run: m.kind for m in msgs}
        assert mine, f"run {run} not recorded; last kind per run recorded: {seen}"
        assert mine[0].kind == "hello" and mine[-1].kind == "bye"
        steps = [
            m.step for m in p.expand_columns(mine) if isinstance(m, p.Scalars) and "loss" in m.names
        ]
        assert steps == list(range(30))


# ----------------------------------------------------------------------------- SSH


def _sshd() -> str | None:
    for cand in (shutil.which("sshd"), "/usr/sbin/sshd"):
        if cand and os.path.exists(cand):
            return cand
    return None


@pytest.fixture
def sshd(tmp_path: Path) -> tuple[int, Path]:
    exe = _sshd()
    if exe is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        reason = (
            "sshd / ssh / ssh-keygen not installed (CI installs openssh-server when apt-get works)"
        )
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    d = tmp_path / "sshd"
    d.mkdir()
    host_key, user_key = d / "host_key", d / "user_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(user_key)], check=True)
    auth = d / "authorized_keys"
    auth.write_text((d / "user_key.pub").read_text())
    auth.chmod(0o600)
    Path("/run/sshd").mkdir(exist_ok=True)
    port = free_port_pair()
    config = d / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nAuthorizedKeysFile {auth}\n"
        "PasswordAuthentication no\nStrictModes no\nPermitRootLogin yes\nUsePAM no\n"
        "AllowTcpForwarding yes\nPidFile none\n"
    )
    proc = subprocess.Popen([exe, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)
    time.sleep(0.5)
    if proc.poll() is not None:
        reason = f"sshd would not start: {proc.stderr.read().decode() if proc.stderr else ''}"
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    yield port, user_key
    proc.terminate()
    proc.wait(10)


def test_ssh_tunnel_to_a_loopback_agent(
    procs: Procs, endpoint: str, sshd: tuple[int, Path]
) -> None:
    from stiffmon.tunnel import Tunnel

    port, key = sshd
    agent_port = int(endpoint.rsplit(":", 1)[1])
    proc = procs.start(
        "-m", "tests.agent.train_script", "--endpoint", endpoint, "--forever", "--delay", "0.01"
    )
    _, run = wait_ready(proc)
    opts = ("-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null")
    user = os.environ.get("USER") or "root"
    with Tunnel(f"ssh://{user}@127.0.0.1:{agent_port}", ssh_port=port, extra_args=opts) as tunnel:
        client = Client([tunnel.endpoint])
        try:
            msgs = collect(
                client,
                lambda ms: any(
                    m.run == run and m.kind in p.PER_STEP_KINDS and m.step > 20 for m in ms
                ),
            )
        finally:
            client.close()
    assert any(m.kind == "hello" and m.run == run for m in msgs)


def test_ssh_failure_is_a_clear_error() -> None:
    from stiffmon.tunnel import Tunnel, TunnelError

    if shutil.which("ssh") is None:
        pytest.skip("no ssh client")
    port = free_port_pair()  # nothing listens there
    with pytest.raises(TunnelError, match=r"ssh to .* failed"):
        Tunnel("ssh://nobody@127.0.0.1:5555", ssh_port=port, extra_args=("-o", "ConnectTimeout=3"))
