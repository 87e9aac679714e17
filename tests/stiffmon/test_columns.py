"""The columnar per-step stream (protocol version 2): wire form, validation, store, index, and
that version-1 frames and the committed demo sessions still read unchanged."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stiffmon import protocol as p
from stiffmon.session import SessionReader, SessionWriter
from stiffmon.store import Series, Store
from tests.stiffmon.strategies import MESSAGES

ROOT = Path(__file__).resolve().parents[2]


def batch(steps: np.ndarray, seq: int = 1, run: str = "r", **cols: np.ndarray) -> p.Columns:
    times = 1e9 + steps.astype(np.float64) * 0.01
    return p.Columns.from_columns(cols, steps, times, run=run, seq=seq)


def _reheader(frames: list[bytes], **changes: object) -> list[bytes]:
    h = json.loads(frames[1])
    h.update(changes)
    return [frames[0], json.dumps(h).encode(), *frames[2:]]


# ------------------------------------------------------------------ wire form


def test_consecutive_steps_and_constant_columns_travel_as_one_element() -> None:
    n = 1000
    loss = np.linspace(2.0, 0.1, n)
    msg = batch(np.arange(500, 500 + n), loss=loss, lr=np.full(n, 0.1))
    frames = p.encode(msg)
    assert [len(f) for f in frames[2:]] == [8, 8 * n, 8 * n, 8]  # steps, times, loss, lr
    out = p.decode(frames)
    assert out == msg and len(out) == n
    np.testing.assert_array_equal(out.steps, np.arange(500, 500 + n))
    np.testing.assert_array_equal(out.column("lr"), np.full(n, 0.1))
    assert out.step == 500 + n - 1 and out.t == msg.times[-1]
    assert json.loads(frames[1])["first_step"] == 500
    per_step = sum(map(len, frames)) / n
    assert per_step < 17  # time + loss, and the header spread over the batch


def test_shortening_is_bitwise() -> None:
    """-0.0 and 0.0, or NaNs, are only merged when their bits are equal."""
    signed = np.array([0.0, -0.0, 0.0])
    nans = np.array([np.nan, np.nan, np.nan])
    msg = batch(np.array([0, 2, 3]), a=signed, b=nans)
    frames = p.encode(msg)
    assert [len(f) for f in frames[2:]] == [24, 24, 24, 8]  # steps not consecutive; b merged
    out = p.decode(frames)
    assert np.signbit(out.column("a")).tolist() == [False, True, False]
    assert np.isnan(out.column("b")).all() and out == msg


def test_rows_expand_to_scalars() -> None:
    msg = batch(np.array([3, 4]), loss=np.array([1.0, 0.5]), lr=np.array([0.1, 0.1]))
    rows = msg.rows()
    assert [r.step for r in rows] == [3, 4]
    assert rows[1].as_dict() == {"loss": 0.5, "lr": 0.1}
    assert rows[0].t == msg.times[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": np.array([2, 1]), "step": 1}, "non-decreasing"),
        ({"steps": np.array([1, 2]), "step": 5}, "last row"),
        ({"steps": np.zeros(0, np.int64), "step": 0}, "rows"),
        ({"times": np.array([1.0, np.inf])}, "finite"),
        ({"times": np.array([1.0])}, "one per step"),
        ({"names": ("a", "b")}, "2 names but 1"),
    ],
)
def test_encode_refuses_inconsistent_batches(kwargs: dict[str, object], match: str) -> None:
    fields: dict[str, object] = {
        "run": "r",
        "seq": 0,
        "step": 2,
        "t": 0.0,
        "names": ("a",),
        "steps": np.array([1, 2]),
        "times": np.array([0.0, 1.0]),
        "values": (np.array([1.0, 2.0]),),
    }
    fields.update(kwargs)
    with pytest.raises(ValueError, match=match):
        p.encode(p.Columns(**fields))  # type: ignore[arg-type]


def _good() -> list[bytes]:
    return p.encode(batch(np.array([4, 6, 7]), loss=np.array([1.0, 2.0, 3.0])))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda f: _reheader(f, v=1), "needs protocol version 2"),
        (lambda f: _reheader(f, first_step=5), "header says"),
        (lambda f: _reheader(f, step=8), "header says"),
        (lambda f: _reheader(f, names=["loss", "x"]), "need 4"),
        (lambda f: _reheader(f, names="loss"), "'names'"),
        (lambda f: f[:-1], "got 2 buffers"),
        (lambda f: [*f[:2], np.array([7, 6, 4]).tobytes(), *f[3:]], "header says"),
        (lambda f: [*f[:2], np.array([4, 3, 7]).tobytes(), *f[3:]], "non-decreasing"),
        (lambda f: [*f[:3], np.array([0.0, np.nan, 1.0]).tobytes(), f[4]], "finite"),
        (lambda f: [*f[:4], np.zeros(2).tobytes()], "needs 24 bytes"),
        (
            lambda f: _reheader(
                [*f[:4], np.zeros(2).tobytes()],
                arrays=[*json.loads(f[1])["arrays"][:2], {"dtype": "<f8", "shape": [2]}],
            ),
            "2 elements for 3 rows",
        ),
        (
            lambda f: _reheader(
                [*f[:4], np.zeros(3, np.float32).tobytes()[:12]],
                arrays=[*json.loads(f[1])["arrays"][:2], {"dtype": "<f4", "shape": [3]}],
            ),
            "must be 1-D <f8",
        ),
    ],
)
def test_decode_validates_batches(mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    p.decode(_good())
    with pytest.raises(p.ProtocolError, match=match):
        p.decode(mutate(_good()))


@pytest.mark.parametrize("kind", sorted(set(MESSAGES) - {"columns"}))
@settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_version_1_frames_still_decode(kind: str, data: st.DataObject) -> None:
    msg = data.draw(MESSAGES[kind])
    frames = _reheader(p.encode(msg), v=1)
    assert p.decode(frames) == msg


# ------------------------------------------------------------------ store


def test_store_applies_a_batch_like_its_rows() -> None:
    rng = np.random.default_rng(0)
    n = 300
    steps = np.arange(n)
    cols = {"loss": rng.normal(size=n), "lr/0": np.full(n, 0.1), "accuracy": rng.random(n)}
    cols["loss"][17] = np.nan
    msgs = [
        batch(steps[i : i + 50], seq=1 + i // 50, **{k: v[i : i + 50] for k, v in cols.items()})
        for i in range(0, n, 50)
    ]
    by_batch, by_row = Store(), Store()
    by_batch.extend(msgs)
    by_row.extend(r for m in msgs for r in m.rows())
    a, b = by_batch.runs["r"], by_row.runs["r"]
    assert set(a.scalars) == set(b.scalars) | {"step_time"}
    for name, s in b.scalars.items():
        np.testing.assert_array_equal(a.scalars[name].steps, s.steps)
        np.testing.assert_array_equal(a.scalars[name].times, s.times)
        np.testing.assert_array_equal(a.scalars[name].values, s.values)
    step_time = a.scalars["step_time"]  # derived across batch boundaries too
    np.testing.assert_array_equal(step_time.steps, steps[1:])
    np.testing.assert_allclose(step_time.values, 0.01, rtol=1e-4)
    assert a.last_step == n - 1 and a.first_t == msgs[0].times[0] and a.last_t == msgs[-1].t


def test_step_time_only_between_consecutive_steps() -> None:
    store = Store()
    store.apply(batch(np.array([0, 1, 5, 6]), loss=np.ones(4)))
    store.apply(batch(np.array([7, 9, 10]), seq=2, loss=np.ones(3)))
    assert store.runs["r"].scalars["step_time"].steps.tolist() == [1, 6, 7, 10]


def test_sparse_columns_are_values_at_some_steps_not_step_times() -> None:
    """A history chunk of logged values (``sparse``): stored like its rows, no step time from it,
    and it leaves the per-step stream's step times as they were."""
    store = Store()
    store.apply(batch(np.array([0, 1, 2]), loss=np.ones(3)))
    logged = p.Columns.from_columns(
        {"custom/val": [0.5, 0.4, 0.3]}, [3, 4, 5], [9.0, 9.5, 10.0], run="r", seq=2, sparse=True
    )
    assert p.decode(p.encode(logged)) == logged
    assert logged != dataclasses.replace(logged, sparse=False)
    assert b'"sparse":true' in p.encode(logged)[1]
    assert b"sparse" not in p.encode(batch(np.arange(2)))[1]  # the per-step stream: unchanged
    store.apply(logged)
    store.apply(batch(np.array([3, 4]), seq=3, loss=np.ones(2)))
    run = store.runs["r"]
    assert run.scalars["custom/val"].steps.tolist() == [3, 4, 5]
    assert run.scalars["custom/val"].values.tolist() == [0.5, 0.4, 0.3]
    assert run.scalars["step_time"].steps.tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(run.scalars["step_time"].values, 0.01, rtol=1e-4)
    joined = p.Columns.from_columns(
        {"x": [1.0, 2.0]},
        [3, 8],
        [1.0, 2.0],
        run="r",
        seq=7,
        batch_seqs=[4, 7],
        batch_ends=[1, 2],
        sparse=True,
    )
    rest = joined.after(4)  # what a client that had seq 4 keeps is sparse too
    assert rest is not None and rest.sparse and rest.steps.tolist() == [8]
    with pytest.raises(p.ProtocolError, match="sparse"):
        p.decode(_reheader(p.encode(logged), sparse=1))


def test_series_extend_matches_append_and_decimates() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(size=5000)
    values[3210] = 99.0
    a, b = Series(max_points=100_000), Series(max_points=100_000)
    for i, v in enumerate(values):
        a.append(i, float(i), float(v))
    for lo in range(0, 5000, 700):
        hi = min(lo + 700, 5000)
        b.extend(np.arange(lo, hi), np.arange(lo, hi, dtype=float), values[lo:hi])
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.steps, b.steps)
    small = Series(max_points=500)
    small.extend(np.arange(5000), np.arange(5000.0), values)  # one batch far over the bound
    assert len(small) <= 500 and small.values.max() == 99.0
    assert np.all(np.diff(small.steps) > 0) and small.steps[0] == 0


# ------------------------------------------------------------------ session files


def test_index_finds_the_batch_holding_a_step(tmp_path: Path) -> None:
    path = tmp_path / "c.stiff"
    with SessionWriter(path) as w:
        w.write(p.Hello(run="r", seq=0, step=0, t=1e9))
        for i in range(10):
            steps = np.arange(100 * i, 100 * i + 100)
            w.write(batch(steps, seq=1 + i, loss=steps * 1.0))
    reader = SessionReader(path)
    index = reader.index()
    assert index.steps.tolist() == [0, *range(99, 1000, 100)]
    assert index.first_steps.tolist() == [0, *range(0, 1000, 100)]  # each batch's step range
    assert isinstance(next(reader.messages(index.offset_for_step(0))), p.Hello)
    for step in (1, 99, 100, 250, 999):
        first = next(reader.messages(index.offset_for_step(step)))
        assert isinstance(first, p.Columns) and first.steps[0] <= step <= first.steps[-1]
    assert index.offset_for_step(1000) == index.end


# Figures of the committed demo sessions, read with the version-1 code before the columnar
# stream existed: (steps of loss, sum of loss, sum of lr/0, measurements and sum of λ1_H).
DEMO = {
    "lr0.01.stiff": (1500, 1148.2375984117389, 15.0, 79, 662.9005563855171),
    "lr0.05.stiff": (1500, 310.09466643771157, 75.0, 79, 635.0996069908142),
    "lr0.2.stiff": (1500, 98.31100600009086, 300.0, 79, 271.46330177783966),
}


@pytest.mark.parametrize("name", sorted(DEMO))
def test_committed_demo_sessions_replay_unchanged(name: str) -> None:
    reader = SessionReader(ROOT / "demos" / "sessions" / name)
    msgs = list(reader.messages())  # raises on any record that no longer decodes
    assert reader.ignored_bytes == 0 and len(msgs) == 2451
    store = Store()
    store.extend(msgs, replay=True)
    (rd,) = store.runs.values()
    n, loss_sum, lr_sum, measured, lam_sum = DEMO[name]
    assert len(rd.scalars["loss"]) == n and len(rd.scalars["step_time"]) == n - 1
    assert float(rd.scalars["loss"].values.sum()) == pytest.approx(loss_sum, rel=1e-12)
    assert float(rd.scalars["lr/0"].values.sum()) == pytest.approx(lr_sum, rel=1e-12)
    lam = rd.scalars["sharpness/lambda1_h"]
    assert len(lam) == measured
    assert float(lam.values.sum()) == pytest.approx(lam_sum, rel=1e-12)
    assert len(rd.matrices) == 6 and rd.finished and rd.last_step == 1500


def test_a_non_finite_loss_in_a_batch_marks_the_divergence() -> None:
    store = Store()
    store.apply(batch(np.arange(0, 4), loss=np.array([1.0, 0.9, 0.8, 0.7])))
    assert store.runs["r"].diverged_step is None
    store.apply(batch(np.arange(4, 8), seq=2, loss=np.array([0.6, np.inf, np.nan, 0.5])))
    store.apply(batch(np.arange(8, 10), seq=3, loss=np.array([np.nan, np.nan])))
    assert store.runs["r"].diverged_step == 5


def _joined() -> list[bytes]:
    st = np.arange(10, 16)
    msg = p.Columns.from_columns(
        {"loss": st * 1.0}, st, st * 1.0, run="r", seq=9, batch_seqs=[3, 4, 9], batch_ends=[2, 3, 6]
    )
    return p.encode(msg)


def _with_batches(f: list[bytes], seqs: list[int], ends: list[int]) -> list[bytes]:
    return [*f[:-2], np.array(seqs, np.int64).tobytes(), np.array(ends, np.int64).tobytes()]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda f: _with_batches(f, [3, 4, 8], [2, 3, 6]), "up to the seq 9"),
        (lambda f: _with_batches(f, [4, 4, 9], [2, 3, 6]), "batch seqs must increase"),
        (lambda f: _with_batches(f, [3, 4, 9], [2, 2, 6]), "batch ends must increase"),
        (lambda f: _with_batches(f, [3, 4, 9], [2, 3, 5]), "up to the 6 rows"),
        (lambda f: _with_batches(f, [3, 4, 9], [0, 3, 6]), "from 1 or more"),
        (lambda f: _reheader(f, batches=2), "1-D <i8 of 2"),
        (lambda f: _reheader(f, batches=0), "out of range"),
        (lambda f: f[:-2], "got 3 buffers"),
    ],
)
def test_decode_validates_joined_batches(mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    msg = p.decode(_joined())
    assert isinstance(msg, p.Columns) and msg.batch_seqs.tolist() == [3, 4, 9]
    with pytest.raises(p.ProtocolError, match=match):
        p.decode(mutate(_joined()))


def test_after_keeps_the_batches_a_client_does_not_have() -> None:
    msg = p.decode(_joined())
    assert isinstance(msg, p.Columns)
    assert msg.after(2) is msg and msg.after(9) is None and msg.after(100) is None
    rest = msg.after(3)
    assert rest is not None
    assert (rest.seq, rest.steps.tolist(), rest.batch_seqs.tolist(), rest.batch_ends.tolist()) == (
        9,
        [12, 13, 14, 15],
        [4, 9],
        [1, 4],
    )
    last = msg.after(5)  # between batches 4 and 9: batch 9 alone, stored as a plain batch
    assert last is not None and last.steps.tolist() == [13, 14, 15] and len(last.batch_seqs) == 0
    assert p.decode(p.encode(last)) == last
