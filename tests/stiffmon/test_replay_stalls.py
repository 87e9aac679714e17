"""A recorded run whose loop hung shows the stall a live monitor showed: told from the step times
by the live rule (``max(STEP_STALL_FLOOR, STEP_STALL_FACTOR × median seconds per step)``), as a
warning event of a replay (the log), and in ``stiffmon summary``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stiffmon import protocol as p
from stiffmon.cli import main
from stiffmon.replay_stalls import STALL_CODE
from stiffmon.run_health import STEP_STALL_FACTOR, STEP_STALL_FLOOR
from stiffmon.session import SessionWriter
from stiffmon.store import Store
from stiffmon.summary import run_summary

T0 = 1_000.0


def step_times(n: int, pace: float, hang_after: int | None, hang: float) -> np.ndarray:
    """Agent times of steps 0 … n-1 at ``pace`` s/step, ``hang`` more seconds before the step
    after ``hang_after``."""
    t = T0 + pace * np.arange(n, dtype=np.float64)
    if hang_after is not None:
        t[hang_after + 1 :] += hang
    return t


def messages(
    run: str, times: np.ndarray, batch: int = 40, heartbeats: float = 0.0, bye: bool = True
) -> list[p.Message]:
    """Hello, the step rows in batches of ``batch`` (each sent at its last row's time),
    heartbeats every ``heartbeats`` s (0: none) and a bye."""
    out: list[p.Message] = [p.Hello(run=run, seq=0, step=0, t=float(times[0]), name=run)]
    steps = np.arange(times.size, dtype=np.int64)
    for i in range(0, times.size, batch):
        s, t = steps[i : i + batch], times[i : i + batch]
        loss = np.linspace(2.0, 1.0, s.size)
        out.append(
            p.Columns(
                run=run,
                seq=len(out),
                step=int(s[-1]),
                t=float(t[-1]),
                names=("loss",),
                steps=s,
                times=t,
                values=(loss,),
            )
        )
    if heartbeats:
        for hb in np.arange(times[0], times[-1] + 30.0, heartbeats):
            out.append(p.Heartbeat(run=run, seq=len(out), step=0, t=float(hb)))
    if bye:
        out.append(p.Bye(run=run, seq=len(out), step=int(steps[-1]), t=float(times[-1]) + 0.1))
    out.sort(key=lambda m: m.t)
    return out


def replayed(msgs: list[p.Message]) -> Store:
    store = Store()
    store.extend(msgs, replay=True)
    return store


def brute_force_gaps(times: np.ndarray, batch: int) -> list[tuple[int, float]]:
    """Reference: (step, gap) of every gap above the live limit, the pace the median of the
    per-batch seconds per step the live monitor estimated before it (float64 loops)."""
    out, paces = [], []
    for k in range(1, times.size):
        if paces:
            limit = max(STEP_STALL_FLOOR, STEP_STALL_FACTOR * float(np.median(paces[-16:])))
            if times[k] - times[k - 1] > limit:
                out.append((k - 1, float(times[k] - times[k - 1])))
        if k % batch == batch - 1 or k == times.size - 1:  # a batch's last row: a new estimate
            first = k - (k % batch) - 1 if k >= batch else 0
            paces.append(float(times[k] - times[first]) / (k - first))
    return out


def test_a_60s_hang_is_one_stall_at_its_step() -> None:
    times = step_times(600, 0.05, 300, 60.0)
    rd = replayed(messages("a", times)).runs["a"]
    (stall,) = rd.stall_log.stalls
    ((ref_step, ref_gap),) = brute_force_gaps(times, 40)
    assert (stall.step, stall.resumed) == (ref_step, True) == (300, True)
    assert stall.seconds == pytest.approx(ref_gap, rel=1e-12)  # 60.05 s
    assert stall.limit == STEP_STALL_FLOOR
    (ev,) = [e for e in rd.events if e.code == STALL_CODE and e.attrs.get("derived")]
    assert ev.level == "warning" and ev.step == 300
    assert ev.t == pytest.approx(times[300] + STEP_STALL_FLOOR)  # when the live monitor said it
    assert ev.message.startswith("stalled: no step since 300 for 60s")


def test_slow_steps_raise_the_limit_as_live() -> None:
    """4 s a step: the limit is 5 × 4 = 20 s, so a 15 s step is no stall, a 25 s one is."""
    times = step_times(40, 4.0, None, 0.0)
    times[21:] += 11.0  # step 21 comes 15 s after step 20
    times[31:] += 21.0  # step 31 comes 25 s after step 30
    rd = replayed(messages("b", times, batch=5)).runs["b"]
    assert [(s.step, round(s.seconds, 6)) for s in rd.stall_log.stalls] == [(30, 25.0)]
    assert brute_force_gaps(times, 5) == [(30, pytest.approx(25.0))]
    assert rd.stall_log.stalls[0].limit == pytest.approx(20.0)


def test_no_stall_before_the_pace_is_known_nor_in_a_steady_run() -> None:
    assert not replayed(messages("c", step_times(500, 0.5, None, 0.0))).runs["c"].stall_log.stalls
    times = step_times(100, 0.05, 0, 30.0)  # the first batch spans the gap: no pace before it
    assert brute_force_gaps(times, 40) == []
    assert not replayed(messages("c", times)).runs["c"].stall_log.stalls


def test_a_hang_inside_a_batch_counts() -> None:
    times = step_times(200, 0.05, 110, 20.0)  # steps 80 … 119 in one batch, the gap inside
    rd = replayed(messages("d", times)).runs["d"]
    assert [(s.step, round(s.seconds, 6)) for s in rd.stall_log.stalls] == [(110, 20.05)]


def test_a_run_that_never_resumed_is_stalled_while_its_agent_talks() -> None:
    """Heartbeats for 30 s after the last step, no bye (killed in the hang): open, 30 s so far."""
    times = step_times(200, 0.05, None, 0.0)
    rd = replayed(messages("e", times, heartbeats=1.0, bye=False)).runs["e"]
    (stall,) = rd.stall_log.stalls
    assert stall.step == 199 and not stall.resumed
    assert stall.seconds == pytest.approx(29.0, abs=1.01)  # the last heartbeat's time
    (ev,) = [
        e for e in rd.events if e.code == STALL_CODE and e.attrs.get("derived")
    ]  # one event, updated as it grew
    assert "so far" in ev.message and f"for {round(stall.seconds)}s" in ev.message


def test_a_live_store_keeps_the_stalls_but_logs_none() -> None:
    store = Store()
    store.extend(messages("f", step_times(600, 0.05, 300, 60.0)))
    rd = store.runs["f"]
    assert len(rd.stall_log.stalls) == 1
    assert not [
        e for e in rd.events if e.code == STALL_CODE and e.attrs.get("derived")
    ]  # the live monitor says it itself


def test_summary_says_the_stalls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "hung.stiff"
    with SessionWriter(path) as w:
        for m in messages("g", step_times(600, 0.05, 300, 60.0)):
            w.write(m)
    rd = replayed(messages("g", step_times(600, 0.05, 300, 60.0))).runs["g"]
    s = run_summary(rd)
    assert s["status"].endswith("stalls: 1 (60s at step 300)")
    assert [(d["step"], round(d["seconds"], 2)) for d in s["stalls"]] == [(300, 60.05)]
    assert s["events"] == 0  # the run's own events: the derived stall is not one
    assert main(["summary", str(path), "--json"]) == 0
    assert '"stalls": [{"step": 300' in capsys.readouterr().out.replace("\n", "").replace("  ", "")


def test_a_sparse_recording_is_no_stall_for_its_gaps() -> None:
    """Values at every 20th step, 1 s a step: 20 s between rows is the pace, not a hang; a
    hang of 30 s more between two of them is one (of 30 s: the 19 other steps at the pace)."""
    steps = np.arange(0, 2000, 20, dtype=np.int64)
    times = T0 + steps.astype(np.float64)
    times[50:] += 30.0  # the rows after step 980 come 30 s late
    store = Store()
    for i, (s, t) in enumerate(zip(steps.tolist(), times.tolist(), strict=True)):
        store.apply(p.Scalars(run="h", seq=i, step=s, t=t, names=("loss",), values=np.ones(1)))
    stalls = store.runs["h"].stall_log.stalls
    assert [(s.step, round(s.seconds, 6)) for s in stalls] == [(980, 31.0)]  # 50 s - 19 × 1 s


def test_the_time_before_a_bye_is_no_stall_unless_the_run_was_stopped_in_it() -> None:
    """An evaluation after training (heartbeats, no step for 30 s, then ``close()``) is no hang;
    Ctrl-C in the same quiet is one (the live monitor showed it stalled until then)."""
    times = step_times(200, 0.05, None, 0.0)
    for reason, stalls in (("closed", 0), ("interrupted", 1)):
        msgs = messages("i", times, heartbeats=1.0, bye=False)
        msgs.append(
            p.Bye(run="i", seq=len(msgs), step=199, t=float(times[-1]) + 30.5, reason=reason)
        )
        rd = replayed(msgs).runs["i"]
        assert len(rd.stall_log.stalls) == stalls, reason
        derived = [e for e in rd.events if e.attrs.get("derived")]
        assert len(derived) == stalls, reason
