"""The history served to late joiners: few messages, every published value once, each series in
the order it was published, whatever a client already had."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from stiffmon import protocol as p
from stiffmon_agent.history import HISTORY_CHUNK_ROWS, ColumnHistory, History, ScalarHistory
from stiffmon_agent.history_seq_order import seq_ordered

Rows = dict[str, list[tuple[int, float, int]]]  # name -> (step, value, seq) in delivery order


def _published_rows(sent: list[p.AnyMessage], have: int) -> Rows:
    """What a client that had every message up to ``have`` still needs, per name, in order."""
    out: Rows = defaultdict(list)
    for m in sent:
        if m.seq <= have:
            continue
        if isinstance(m, p.Columns):
            for name, col in zip(m.names, m.values, strict=True):
                out[name] += [(int(s), float(v), m.seq) for s, v in zip(m.steps, col, strict=True)]
        elif isinstance(m, p.Scalars):
            for name, v in zip(m.names, m.values.tolist(), strict=True):
                out[name].append((m.step, v, m.seq))
    return {k: v for k, v in out.items() if v}


def _delivered_rows(snapshot: list[p.AnyMessage], have: int) -> Rows:
    """A naive client: drop what it had (a chunk row by row by its batch's seq), in the
    snapshot's order."""
    out: Rows = defaultdict(list)
    for m in snapshot:
        if isinstance(m, p.Columns):
            seqs, ends = m.batches()
            row_seq = np.repeat(seqs, np.diff(np.concatenate([[0], ends])))
            for name, col in zip(m.names, m.values, strict=True):
                out[name] += [
                    (int(s), float(v), int(q))
                    for s, v, q in zip(m.steps, col, row_seq, strict=True)
                    if q > have
                ]
        elif isinstance(m, p.Scalars) and m.seq > have:
            for name, v in zip(m.names, m.values.tolist(), strict=True):
                out[name].append((m.step, v, m.seq))
    return {k: v for k, v in out.items() if v}


def _run(rng: np.random.Generator, n_batches: int) -> tuple[History, list[p.AnyMessage]]:
    """A run as the agent publishes it: per-step batches, coverage counts after some (their
    names vary with what was due), Agent.log values, a heavy message now and then."""
    hist = History("r", max_values=10**9)
    sent: list[p.AnyMessage] = []
    seq = step = 0

    def keep(m: p.AnyMessage) -> None:
        nonlocal seq
        sent.append(m)
        hist.add(m, p.encode(m))
        seq += 1

    keep(p.Hello(run="r", seq=seq, step=0, t=1.0))
    for _ in range(n_batches):
        k = int(rng.integers(1, 30))
        st = np.arange(step, step + k)
        cols = {"loss": rng.normal(size=k), "lr/0": np.full(k, 0.1)}
        keep(p.Columns.from_columns(cols, st, 1e9 + st * 0.01, run="r", seq=seq))
        step += k
        due = [kind for kind in ("gram", "sharpness") if rng.random() < 0.4]
        if due:
            cov = {f"coverage/{d}/{w}": float(rng.integers(9)) for d in due for w in ("done", "x")}
            keep(p.Scalars.from_dict(cov, run="r", seq=seq, step=step - 1, t=1e9 + step * 0.01))
        if rng.random() < 0.3:
            vals = {"custom/val": float(rng.normal())}
            keep(p.Scalars.from_dict(vals, run="r", seq=seq, step=step - 1, t=1e9 + step * 0.01))
        if rng.random() < 0.05:
            keep(p.Event(run="r", seq=seq, step=step - 1, t=1e9, code="note", message="x"))
    return hist, sent


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_value_comes_once_and_in_order_whatever_the_client_had(seed: int) -> None:
    hist, sent = _run(np.random.default_rng(seed), 400)
    snapshot = [p.decode(f) for f in hist.frames()]
    # one chunk per stream: hello, per-step, 4 coverage names, custom/val, the events
    heavy = [m for m in sent if isinstance(m, p.Hello | p.Event)]
    assert len(snapshot) == len(heavy) + 1 + 4 + 1
    assert all(m.sparse for m in snapshot if isinstance(m, p.Columns) and "loss" not in m.names)
    firsts = [int(m.batches()[0][0]) if isinstance(m, p.Columns) else m.seq for m in snapshot]
    assert firsts == sorted(firsts)  # the snapshot's order: by first seq
    for have in [-1, 0, 3, len(sent) // 3, len(sent) // 2 + 1, len(sent) - 2, len(sent) - 1]:
        assert _delivered_rows(snapshot, have) == _published_rows(sent, have)
        got_heavy = [m for m in snapshot if isinstance(m, p.Hello | p.Event) and m.seq > have]
        assert got_heavy == [m for m in heavy if m.seq > have]


def test_a_name_in_two_streams_is_cut_so_it_stays_in_order() -> None:
    """``loss`` both per step and logged: the streams take turns and never overlap in seq."""
    hist = History("r", max_values=10**9)
    sent: list[p.AnyMessage] = []
    for i in range(6):
        st = np.arange(10 * i, 10 * i + 5)
        b = p.Columns.from_columns({"loss": st * 1.0}, st, st * 1.0, run="r", seq=2 * i)
        s = p.Scalars.from_dict({"loss": -1.0 * i}, run="r", seq=2 * i + 1, step=10 * i + 7, t=1.0)
        for m in (b, s):
            sent.append(m)
            hist.add(m, p.encode(m))
    snapshot = [p.decode(f) for f in hist.frames()]
    assert len(snapshot) == 12  # every turn is a new chunk
    for have in (-1, 4, 7):
        assert _delivered_rows(snapshot, have) == _published_rows(sent, have)


def test_a_step_that_goes_back_starts_a_new_stretch() -> None:
    """``Agent.log(step=...)`` may go back; a ``columns`` message may not."""
    hist = ScalarHistory("r")
    sent = []
    for seq, step in enumerate([5, 9, 3, 4, 12, 1]):
        m = p.Scalars.from_dict({"custom/v": float(step)}, run="r", seq=seq, step=step, t=1.0)
        sent.append(m)
        hist.add(m)
    snapshot = [p.decode(f) for _, f in hist.in_order()]
    assert [m.steps.tolist() for m in snapshot] == [[5, 9], [3, 4, 12], [1]]  # type: ignore[union-attr]
    assert _delivered_rows(snapshot, -1) == _published_rows(sent, -1)
    batches = [
        p.Columns.from_columns({"x": [1.0]}, [s], [1.0], run="r", seq=i)
        for i, s in enumerate([4, 2])
    ]
    cols = ColumnHistory("r")
    for b in batches:
        cols.add(b)
    assert len(cols.in_order()) == 2


@pytest.mark.parametrize("n", [3_000, 30_000])
def test_values_beyond_the_bound_are_thinned_evenly_in_the_busiest_name(n: int) -> None:
    hist = ScalarHistory("r", max_values=1000)
    for seq in range(n):
        names = {"a": float(seq)} if seq % 10 else {"a": float(seq), "b": -float(seq)}
        hist.add(p.Scalars.from_dict(names, run="r", seq=seq, step=seq, t=1.0))
    assert hist.values <= 1000 and hist.thinned == n + n // 10 - hist.values
    rows = _delivered_rows([p.decode(f) for _, f in hist.in_order()], -1)
    for name, every in (("a", 1), ("b", 10)):
        steps = [s for s, _, _ in rows[name]]
        assert [v for _, v, _ in rows[name]] == [(-1.0) ** (name == "b") * s for s in steps]
        assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == n - every
        newest = steps[-len(steps) // 5 :]  # the newest values are kept whole
        assert newest == list(range(newest[0], n, every))
        old = np.diff(steps[: len(steps) // 2])
        assert old.max() <= 4 * np.median(old)  # the older values evenly spread over the run
    if n == 3_000:
        assert rows["b"] and len(rows["b"]) == 300  # the busy name gave way


def test_history_memory_is_about_the_encoded_size() -> None:
    hist = History("r", max_values=10**9)
    seq = 0
    for i in range(2000):
        st = np.arange(50 * i, 50 * i + 50)
        m = p.Columns.from_columns({"loss": np.sin(st)}, st, 1e9 + st * 0.01, run="r", seq=seq)
        hist.add(m, [])
        s = p.Scalars.from_dict({"custom/v": 1.0}, run="r", seq=seq + 1, step=int(st[-1]), t=1e9)
        hist.add(s, [])
        seq += 2
    assert len(hist.frames()) == 3  # 100,000 steps: two per-step chunks and one sparse column
    # 16 bytes a step (times, loss) and a batch, and the open chunk's arrays (24 bytes a row)
    assert hist.columns.nbytes < 16 * 100_000 + 16 * 2000 + 24 * HISTORY_CHUNK_ROWS
    assert hist.scalars.nbytes < 2 * 32 * 2000


def test_history_compacts_batches_and_keeps_every_row() -> None:
    rng = np.random.default_rng(0)
    hist = ColumnHistory("r", chunk_rows=1000)
    sent: list[p.Columns] = []
    step, seq = 0, 0
    for i in range(120):
        k = int(rng.integers(1, 60))
        names = ("loss", "lr/0") if i < 70 or i >= 75 else ("loss", "lr/0", "accuracy")
        st = np.arange(step, step + k)
        cols = {n: rng.normal(size=k) for n in names}
        cols["lr/0"] = np.full(k, 0.1)
        seq += 1 + int(rng.integers(0, 3))  # heavy messages take seqs in between
        msg = p.Columns.from_columns(cols, st, 1e9 + st * 0.01, run="r", seq=seq)
        sent.append(msg)
        hist.add(msg)
        step += k
    chunks = [(s, p.decode(frames)) for s, frames in hist.in_order()]
    assert [s for s, _ in chunks] == sorted({s for s, _ in chunks})  # seq increasing
    # kept under its first batch's seq; it takes the seq of its last batch and lists its
    # batches' seqs and ends
    assert all(isinstance(m, p.Columns) and m.batches()[0][0] == s for s, m in chunks)
    assert all(len(m) <= 1000 for _, m in chunks) and len(chunks) < 20
    lasts = {m.seq for m in sent}
    assert chunks[-1][1].seq == sent[-1].seq and all(m.seq in lasts for _, m in chunks)
    joined = [int(s) for _, m in chunks for s in m.batches()[0]]  # type: ignore[union-attr]
    assert joined == [m.seq for m in sent]
    # a client that has every batch up to some seq gets exactly the rest from a chunk
    by_seq = {m.seq: m for m in sent}
    for _, m in chunks:
        assert isinstance(m, p.Columns)
        seqs = m.batches()[0].tolist()
        for have in [seqs[0] - 1, *seqs]:
            rest = m.after(have)
            want_rows = [r for s in seqs if s > have for r in by_seq[s].rows()]
            if not want_rows:
                assert rest is None
                continue
            assert rest is not None and rest.seq == m.seq
            assert rest.steps.tolist() == [r.step for r in want_rows]
            assert p.decode(p.encode(rest)) == rest
    assert hist.rows == step
    got = [r for _, m in chunks for r in m.rows()]  # type: ignore[union-attr]
    want = [r for m in sent for r in m.rows()]
    assert [(r.step, r.t, r.names) for r in got] == [(r.step, r.t, r.names) for r in want]
    np.testing.assert_array_equal(
        np.concatenate([r.values for r in got]), np.concatenate([r.values for r in want])
    )
    assert hist.nbytes < 40 * step + 16 * len(sent) + 64 * 1024


def _old_client_rows(snapshot: list[p.AnyMessage], have: int) -> Rows:
    """A monitor of before the sparse chunks: it keeps the highest seq so far and drops anything
    at or below it (a chunk: the batches at or below it)."""
    kept: list[p.AnyMessage] = []
    last = have
    for m in snapshot:
        if m.seq <= last:
            continue
        if isinstance(m, p.Columns):
            rest = m.after(last)
            assert rest is not None
            m = rest
        last = m.seq
        kept.append(m)
    return _delivered_rows(kept, have)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_snapshot_in_seq_order_for_monitors_that_ask_for_one(seed: int) -> None:
    hist, sent = _run(np.random.default_rng(seed), 300)
    items = seq_ordered(hist)
    snapshot = [p.decode(f) for _, f in items]
    assert [q for q, _ in items] == [m.seq for m in snapshot]
    assert [m.seq for m in snapshot] == sorted({m.seq for m in snapshot})  # strictly increasing
    assert len(snapshot) < len(sent)  # batches between two other messages stay joined
    for have in [-1, 2, len(sent) // 2, len(sent) - 1]:
        assert _old_client_rows(snapshot, have) == _published_rows(sent, have)
        # the new way's snapshot would lose values for such a monitor
        if have == -1:
            new_way = [p.decode(f) for f in hist.frames()]
            assert _old_client_rows(new_way, have) != _published_rows(sent, have)
    # the scalars messages come back as they were published (thinned values aside)
    scalars = [m for m in snapshot if isinstance(m, p.Scalars)]
    published = [m for m in sent if isinstance(m, p.Scalars)]
    assert [(m.seq, m.step, m.as_dict()) for m in scalars] == [
        (m.seq, m.step, m.as_dict()) for m in published
    ]
