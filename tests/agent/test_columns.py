"""The columnar per-step stream on the agent side: batching, conversion, nothing lost."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stiffmon import protocol as p
from stiffmon.client import Client
from stiffmon.session import SessionReader, read_session
from stiffmon.store import Store
from stiffmon_agent import Agent
from stiffmon_agent.columns import Accuracy, ColumnBatcher, RawColumns, build_columns
from tests.conftest import free_port_pair


def test_batcher_closes_on_rows_names_and_age() -> None:
    got: list[RawColumns] = []
    b = ColumnBatcher(lambda raw: got.append(raw) is None, max_rows=3, interval=60.0)
    now = time.time()  # flush(older_than=...) compares with the wall clock
    for s in range(7):
        b.add(s, now + s * 1e-3, ("loss",), [float(s)])
    assert [r.steps for r in got] == [[0, 1, 2], [3, 4, 5]] and len(b) == 1
    b.add(7, now, ("loss", "accuracy"), [7.0, 0.5])  # new names: the open batch goes first
    assert got[-1].steps == [6] and got[-1].names == ("loss",)
    b.flush(older_than=60.0)  # not old enough
    assert len(got) == 3
    b.flush()
    assert got[-1].steps == [7] and got[-1].rows == [(7, now, [7.0, 0.5])] and len(b) == 0
    aged = ColumnBatcher(lambda raw: got.append(raw) is None, interval=0.5)
    aged.add(0, 10.0, ("loss",), [1.0])
    aged.add(1, 10.2, ("loss",), [1.0])
    aged.add(2, 10.6, ("loss",), [1.0])  # 0.6 s after the batch's first row
    assert got[-1].steps == [0, 1, 2]


def test_batcher_counts_what_the_queue_refused() -> None:
    b = ColumnBatcher(lambda raw: False, max_rows=4)
    for s in range(10):
        b.add(s, 0.0, ("loss",), [1.0])
    b.flush()
    assert b.dropped_steps == 10 and b.batches == 3


def test_build_converts_every_kind_of_value() -> None:
    torch.manual_seed(0)
    logits = [torch.randn(16, 5) for _ in range(4)]
    targets = [torch.randint(0, 5, (16,)) for _ in range(4)]
    rows = [
        [
            torch.tensor(0.5 * s),  # tensors: stacked once
            0.1,  # floats
            Accuracy.of(logits[s], targets[s]),  # hit counts, stacked once
            [1.0, 2.0] if s == 2 else 3,  # not a number at one row: NaN there
            torch.tensor([1.0, 2.0]) if s == 1 else torch.tensor(s),  # shapes differ
        ]
        for s in range(4)
    ]
    names = ("loss", "lr/0", "accuracy", "odd", "mixed")
    raw = RawColumns(names, [(s + 5, s + 1.0, row) for s, row in enumerate(rows)])
    msg = build_columns(raw, run="r", seq=4)
    assert (msg.step, msg.t, msg.seq) == (8, 4.0, 4)
    np.testing.assert_array_equal(msg.column("loss"), [0.0, 0.5, 1.0, 1.5])
    np.testing.assert_array_equal(msg.column("lr/0"), [0.1] * 4)
    expected = [
        float((lg.argmax(-1) == t).double().mean()) for lg, t in zip(logits, targets, strict=True)
    ]
    np.testing.assert_allclose(msg.column("accuracy"), expected, rtol=1e-12)
    odd = msg.column("odd")
    assert odd[[0, 1, 3]].tolist() == [3.0, 3.0, 3.0] and math.isnan(odd[2])
    mixed = msg.column("mixed")
    assert math.isnan(mixed[1]) and mixed[[0, 2, 3]].tolist() == [0.0, 2.0, 3.0]
    assert p.decode(p.encode(msg)) == msg


def test_tight_loop_of_100k_steps_loses_nothing(tmp_path: Path) -> None:
    """The issue's case: no probe, recording on, 100,000 steps as fast as Python goes."""
    n = 100_000
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = tmp_path / "tight.stiff"
    agent = Agent(model, nn.CrossEntropyLoss(), opt, endpoint="", record=rec, registry=False)
    losses = np.linspace(2.0, 0.1, n)
    for loss in losses.tolist():
        agent.step(loss)
    agent.close()
    assert agent.dropped == 0
    msgs, scan = read_session(rec)
    assert scan.state == "clean"
    batches = [m for m in msgs if isinstance(m, p.Columns)]
    steps = np.concatenate([m.steps for m in batches])
    np.testing.assert_array_equal(steps, np.arange(n))  # every step, once, in order
    loss = np.concatenate([m.column("loss") for m in batches])
    np.testing.assert_array_equal(loss, losses)
    assert all(m.names == ("loss", "lr/0", "momentum/0", "weight_decay/0") for m in batches)
    per_step = rec.stat().st_size / n
    assert per_step <= 42, f"{per_step:.1f} bytes per step"  # loss + lr (+ momentum)
    index = SessionReader(rec).index()
    assert len(index) == len(msgs)


def test_a_batch_goes_out_when_the_loop_pauses(tmp_path: Path) -> None:
    model = nn.Linear(4, 2)
    rec = tmp_path / "pause.stiff"
    agent = Agent(model, nn.CrossEntropyLoss(), None, endpoint="", record=rec, registry=False)
    try:
        for i in range(10):
            agent.step(float(i))
        deadline = time.monotonic() + 10
        rows: list[p.AnyMessage] = []
        while time.monotonic() < deadline and len(rows) < 10:
            time.sleep(0.05)  # the training loop is busy elsewhere: nobody calls step()
            rows = [m for m in p.expand_columns(read_session(rec)[0]) if m.kind == "scalars"]
        assert [m.step for m in rows] == list(range(10))
    finally:
        agent.close()


@pytest.mark.slow
def test_late_joiner_gets_every_step_without_decimation() -> None:
    n = 50_000  # five times the old bound of 10,000 kept per-step messages
    ep = f"tcp://127.0.0.1:{free_port_pair()}"
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = Agent(model, nn.CrossEntropyLoss(), opt, endpoint=ep, registry=False)
    client = None
    try:
        for i in range(n):
            agent.step(1.0 / (1 + i))
            if i % 50 == 49:  # a batch ends and a value of another kind comes between batches
                agent._columns.flush()
                agent.log(val=float(i))
        agent._columns.flush()
        pub = agent.publisher
        assert pub is not None
        deadline = time.monotonic() + 30
        while pub._queue.qsize() and time.monotonic() < deadline:
            time.sleep(0.05)
        client = Client([ep], snapshot_timeout=10)
        store = Store()
        messages = 0
        deadline = time.monotonic() + 60
        while client.stats.snapshots == 0 and time.monotonic() < deadline:
            got = [m for m, _ in client.poll(0.1)]
            messages += len(got)
            store.extend(got)
        assert client.stats.snapshots >= 1
        run = store.runs[agent.run_id]
        loss = run.scalars["loss"]
        np.testing.assert_array_equal(loss.steps, np.arange(n))
        np.testing.assert_array_equal(loss.values, 1.0 / (1 + np.arange(n)))
        val = run.scalars["custom/val"]
        np.testing.assert_array_equal(val.steps, np.arange(49, n, 50))
        np.testing.assert_array_equal(val.values, np.arange(49, n, 50))
        # 1,000 batches cut by 1,000 logged values: still a handful of messages, not 2,000
        assert messages < 10, messages
        assert len(run.scalars["step_time"]) == n - 1  # none made up from the logged values
    finally:
        if client is not None:
            client.close()
        agent.close()
