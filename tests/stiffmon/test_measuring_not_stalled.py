"""A heavy measurement is no hang: while the agent's heartbeats say the training loop is in one,
the run is live (``measuring …``), and the time up to the measurement's last message is no
stall, live or replayed. Before, a 30 s measurement on 0.05 s steps showed ``stalled 12s (no step
since 149; agent alive)`` and a replay logged it as a stall."""

from __future__ import annotations

import numpy as np
import pytest

from stiffmon import protocol as p
from stiffmon.protocol import codec
from stiffmon.store import Store
from tests.stiffmon.timeline import SKEW, FakeAgent


def measured_at_149(coverage: bool) -> tuple[Store, FakeAgent]:
    """Steps 0…149 every 0.05 s, then a 30 s sharpness measurement of step 149 (heartbeats say
    so), its coverage scalars at its end (``coverage``), then steps again."""
    store = Store()
    agent = FakeAgent(store)
    agent.steps(0.05 * (k + 1) for k in range(150))
    agent.advance(7.5)
    agent.measuring = "sharpness"
    for now in np.arange(8.0, 37.5, 0.5):
        agent.advance(float(now))
        h = store.runs["r"].health(now=agent.now)
        assert h.state == "live", (now, h.text)
    agent.measuring = ""
    if coverage:
        agent.send(p.Scalars, 149, names=("coverage/sharpness",), values=np.ones(1))
    agent.steps([37.55, 37.6, 37.65])
    agent.advance(40.0)
    return store, agent


def test_a_measuring_loop_is_live_and_says_what_it_measures() -> None:
    store, agent = measured_at_149(coverage=True)
    rd = store.runs["r"]
    assert rd.progress.step == 152 and rd.health(now=agent.now).text == "live"
    assert not rd.stall_log.stalls  # the 30 s were a measurement, not a stall


def test_the_run_list_says_measuring_while_no_step_comes() -> None:
    store = Store()
    agent = FakeAgent(store)
    agent.steps(0.05 * (k + 1) for k in range(150))
    agent.advance(7.5)
    agent.measuring = "density"
    agent.advance(25.0)
    h = store.runs["r"].health(now=agent.now)
    assert (h.state, h.level, h.text) == ("live", "ok", "live (measuring density, 18s)")
    agent.measuring = ""  # the measurement over, still no step: a hang, said as before
    agent.advance(40.0)
    assert store.runs["r"].health(now=agent.now).state == "stalled"


def test_a_replay_leaves_a_measurement_out_of_the_stalls() -> None:
    """A replay has no heartbeats: the measurement's coverage scalars, made at its end, mark
    the loop busy up to then."""
    msgs: list[p.Message] = [p.Hello(run="r", seq=0, step=0, t=SKEW, name="r")]
    steps = np.arange(150, dtype=np.int64)
    times = SKEW + 0.05 * (steps + 1)
    msgs.append(
        p.Columns(run="r", seq=1, step=149, t=float(times[-1]), names=("loss",), steps=steps,
                  times=times, values=(np.ones(150),))
    )  # fmt: skip
    end = float(times[-1]) + 30.0
    cov = p.Scalars(
        run="r", seq=2, step=149, t=end, names=("coverage/sharpness",), values=np.ones(1)
    )
    later = np.arange(150, 160, dtype=np.int64)
    t_later = end + 0.05 * (later - 149)
    rows = p.Columns(run="r", seq=3, step=159, t=float(t_later[-1]), names=("loss",), steps=later,
                     times=t_later, values=(np.ones(10),))  # fmt: skip
    with_cov = Store()
    with_cov.extend([*msgs, cov, rows], replay=True)
    assert not with_cov.runs["r"].stall_log.stalls
    without = Store()  # the same gap with nothing from the loop in it: a stall, as before
    without.extend([*msgs, rows], replay=True)
    (stall,) = without.runs["r"].stall_log.stalls
    assert stall.step == 149 and stall.seconds == pytest.approx(30.05)


def test_the_heartbeat_field_round_trips_and_older_heartbeats_read_as_not_measuring() -> None:
    hb = p.Heartbeat(run="r", seq=3, step=7, t=1.0, last_seq=2, dropped=0, measuring="gram")
    assert p.decode(p.encode(hb)).measuring == "gram"  # type: ignore[union-attr]
    topic, header, *rest = p.encode(p.Heartbeat(run="r", seq=3, step=7, t=1.0))
    old = header.replace(b', "measuring": ""', b"")  # what an agent before the field sends
    assert b"measuring" not in old
    assert p.decode([topic, old, *rest]).measuring == ""  # type: ignore[union-attr]
    for bad in (b'"' + b"x" * 65 + b'"', b"3"):
        forged = header.replace(b'"measuring": ""', b'"measuring": ' + bad)
        with pytest.raises(p.ProtocolError, match="measuring"):
            codec.decode([topic, forged, *rest])
