"""The log dates a monitor event (a stall, a loss) when it happened on the agent's clock: a hung
loop whose agent still sends heartbeats is news when it is noticed, not at its last step (the
log said ``+7s  stalled: no step since 149 for 12s``, before the run's earlier events)."""

from __future__ import annotations

import pytest

from stiffmon.store import Store
from stiffmon.tui import chrome
from tests.stiffmon.timeline import SKEW, FakeAgent


def test_a_hung_loop_is_dated_when_noticed() -> None:
    store = Store()
    agent = FakeAgent(store, "a")
    agent.steps(0.05 * (k + 1) for k in range(150))  # step 149 at 7.5 s, then it hangs
    agent.advance(19.5)  # heartbeats keep coming, no step for 12 s
    rd = store.runs["a"]
    h = rd.health(19.5)
    assert h.state == "stalled" and "agent alive" in h.text
    step, t = chrome.when(rd, f"stalled: {h.why}", 19.5)
    assert step == 149
    assert t - SKEW == pytest.approx(19.5, abs=0.2)  # now, not step 149's 7.5 s


def test_a_silent_run_is_dated_at_its_last_word_plus_the_quiet() -> None:
    store = Store()
    agent = FakeAgent(store, "b", heartbeats=False)
    agent.steps(0.05 * (k + 1) for k in range(100))  # step 99 at 5 s, then nothing at all
    agent.advance(5.0)
    rd = store.runs["b"]
    _, t = chrome.when(rd, "stalled: no message for 3 s", 9.0)
    assert t - SKEW == pytest.approx(9.0, abs=0.2)
