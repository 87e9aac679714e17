"""A hung training loop whose agent still sends heartbeats is stalled; a slow one is not."""

from __future__ import annotations

from stiffmon import protocol as p
from stiffmon.store import STEP_STALL_FLOOR, Store
from tests.stiffmon.timeline import SKEW, FakeAgent


def hung_at_149() -> tuple[Store, FakeAgent]:
    """Steps 0…149 every 0.05 s (step 149 at monitor time 7.5), then heartbeats only."""
    store = Store()
    agent = FakeAgent(store)
    agent.steps(0.05 * (k + 1) for k in range(150))
    agent.advance(7.5)
    return store, agent


def test_heartbeats_without_new_steps_stall_the_run() -> None:
    store, agent = hung_at_149()
    rd = store.runs["r"]
    assert rd.status(now=7.5) == "live" and rd.progress.step == 149
    agent.advance(7.5 + STEP_STALL_FLOOR - 1)  # the floor: a pause this short is no stall
    assert rd.status(now=agent.now) == "live"
    agent.advance(19.5)
    assert rd.status(now=agent.now) == "stalled"
    h = rd.health(now=agent.now)
    assert (h.state, h.level) == ("stalled", "warning")
    assert h.text == "stalled 12s (no step since 149; agent alive)"
    assert h.why == "no step since 149 for 12s; agent alive"
    agent.advance(150.0)  # the process is alive: never lost while heartbeats come
    h = rd.health(now=agent.now)
    assert (h.state, h.text) == ("stalled", "stalled 2m (no step since 149; agent alive)")


def test_steps_resuming_make_the_run_live_again() -> None:
    store, agent = hung_at_149()
    rd = store.runs["r"]
    agent.advance(30.0)
    assert rd.status(now=agent.now) == "stalled"
    agent.steps([30.05, 30.1, 30.15])
    agent.advance(30.2)
    assert rd.status(now=agent.now) == "live" and rd.health(now=agent.now).text == "live"
    assert rd.progress.step == 152


def test_a_slow_but_steady_run_stays_live() -> None:
    """30 s per step with a heartbeat every second: long gaps, but at the run's own pace."""
    store = Store()
    agent = FakeAgent(store)
    agent.steps(30.0 * (k + 1) for k in range(10))
    while agent.now < 300.0:
        agent.advance(agent.now + 0.5)
        h = store.runs["r"].health(now=agent.now)
        assert (h.state, h.text) == ("live", "live"), agent.now
    agent.advance(300.0 + 30.0 * 5 + 5)  # five of its step intervals and more: stalled
    assert store.runs["r"].health(now=agent.now).text.endswith("(no step since 9; agent alive)")


def test_no_heartbeat_is_the_older_stall_and_ends_lost() -> None:
    store = Store()
    agent = FakeAgent(store, heartbeats=False)
    agent.steps(0.05 * (k + 1) for k in range(150))
    agent.advance(7.5)
    rd = store.runs["r"]
    h = rd.health(now=12.5)
    assert (h.state, h.text, h.why) == ("stalled", "stalled 5s", "no message for 3 s")
    assert rd.health(now=100.0).state == "lost"


def test_the_agent_clock_alone_decides() -> None:
    """Monitor times of the messages do not matter, only the agent's times and step rows."""
    store, _ = hung_at_149()
    rd = store.runs["r"]
    # a heartbeat 20 s later on the agent's clock, received at once on the monitor's
    store.apply(p.Heartbeat(run="r", seq=999, step=149, t=7.5 + 20.0 + SKEW, last_seq=998), now=7.6)
    assert rd.status(now=7.6) == "stalled"
    assert rd.health(now=7.6).text == "stalled 20s (no step since 149; agent alive)"


def test_before_its_pace_is_known_a_run_is_not_judged() -> None:
    """One step, then a long first compile or data load: no pace to judge by yet."""
    store = Store()
    agent = FakeAgent(store)
    agent.steps([0.5])
    agent.advance(60.0)
    assert store.runs["r"].status(now=agent.now) == "live"


def test_replays_and_finished_runs_are_unaffected() -> None:
    store, agent = hung_at_149()
    agent.advance(30.0)
    agent.send(p.Bye, 149, reason="closed")
    assert store.runs["r"].health(now=agent.now).state == "finished"
    replay = Store()
    for m in hung_heartbeats():
        replay.apply(m, replay=True, now=0.0)
    assert replay.runs["q"].status(now=100.0) == "replay"


def hung_heartbeats() -> list[p.Message]:
    """A recorded run: steps 0…9 a second apart, then 60 s of heartbeats (its replay)."""
    out: list[p.Message] = [p.Hello(run="q", seq=0, step=0, t=SKEW)]
    out += [
        p.Scalars.from_dict({"loss": 0.5}, run="q", seq=1 + s, step=s, t=SKEW + s)
        for s in range(10)
    ]
    out += [p.Heartbeat(run="q", seq=20 + k, step=9, t=SKEW + 10 + k) for k in range(60)]
    return out
