"""Damaged records, duplicate recordings, bad records and crashed runs, through every tool."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from stiffmon import protocol as p
from stiffmon.cli import main
from stiffmon.session import SessionReader, SessionWriter, read_sessions
from stiffmon.store import Store
from stiffmon.tui.sources import ReplaySource

STEPS = 40


def run_messages(run: str = "r1", *, bye: bool = True) -> list[p.AnyMessage]:
    """A hello, one scalars message per step, an event every 10 steps, and (``bye``) a bye."""
    out: list[p.AnyMessage] = [
        p.Hello(run=run, seq=0, step=0, t=1000.0, name="mlp", optimizer={"lr": 0.1})
    ]
    for step in range(STEPS):
        out.append(
            p.Scalars.from_dict(
                {"loss": 1.0 / (step + 1)}, run=run, seq=len(out), step=step, t=1000.0 + step
            )
        )
        if step % 10 == 0:
            out.append(
                p.Event(
                    run=run,
                    seq=len(out),
                    step=step,
                    t=1000.0 + step,
                    level="info",
                    code="note",
                    message=f"at {step}",
                )
            )
    if bye:
        out.append(p.Bye(run=run, seq=len(out), step=STEPS, t=2000.0, reason="done"))
    return out


def write(path: Path, msgs: list[p.AnyMessage] | list[list[bytes]]) -> list[int]:
    """Write messages (or raw frames); return the offset of every record."""
    offsets = []
    with SessionWriter(path) as w:
        for m in msgs:
            offsets.append(w.write_frames(m) if isinstance(m, list) else w.write(m))
    return offsets


def loss_rows(out: Path) -> list[dict[str, str]]:
    with (out / "scalars.csv").open() as f:
        return [r for r in csv.DictReader(f) if r["name"] == "loss"]


# ------------------------------------------------------------------ (2) a damaged record


def test_a_flipped_byte_mid_file_loses_one_record_and_every_tool_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    msgs = run_messages()
    path = tmp_path / "flip.stiff"
    offsets = write(path, msgs)
    k = len(msgs) // 2
    raw = bytearray(path.read_bytes())
    raw[offsets[k] + 20] ^= 0xFF  # inside record k's payload: its CRC no longer matches
    path.write_bytes(bytes(raw))
    size = offsets[k + 1] - offsets[k]
    note = f"damaged record at offset {offsets[k]}: skipped {size} bytes"

    reader = SessionReader(path)
    assert list(reader) == msgs[:k] + msgs[k + 1 :]
    assert reader.ignored_bytes == 0 and reader.damaged == {offsets[k]: size}
    index = SessionReader(path).index()
    assert len(index) == len(msgs) - 1 and index.end == len(raw)

    assert main(["summary", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert note in out and "torn tail" not in out
    assert f" {STEPS} " in out  # every step is there
    assert main(["export", str(path), "--format", "csv", "--out", str(tmp_path / "x")]) == 0
    err = capsys.readouterr().err
    assert note in err and "torn tail" not in err
    lost = msgs[k]
    want = STEPS - (1 if isinstance(lost, p.Scalars) else 0)
    assert len(loss_rows(tmp_path / "x")) == want
    src = ReplaySource([path])
    src.load()
    assert len(src.messages) == len(msgs) - 1 and any(note in n for n in src.notes)


def test_a_torn_tail_is_still_a_torn_tail(tmp_path: Path) -> None:
    msgs = run_messages()
    path = tmp_path / "torn.stiff"
    offsets = write(path, msgs)
    raw = path.read_bytes()
    path.write_bytes(raw[: offsets[-1] + 5])
    reader = SessionReader(path)
    assert list(reader) == msgs[:-1] and reader.damaged == {} and reader.ignored_bytes == 5
    _, merge = read_sessions([path])
    assert merge.notes() == [f"{path}: ignored a torn tail of 5 bytes"]


# ------------------------------------------------------------------ (3) one run, two files


def test_the_same_run_in_two_files_is_read_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    msgs = run_messages()
    a, b = tmp_path / "a.stiff", tmp_path / "b.stiff"
    write(a, msgs)
    shutil.copy(a, b)

    out = tmp_path / "x"
    assert main(["export", str(a), str(b), "--format", "csv", "--out", str(out)]) == 0
    capsys.readouterr()
    assert sorted(int(r["step"]) for r in loss_rows(out)) == list(range(STEPS))
    with (out / "events.csv").open() as f:
        assert len(list(csv.DictReader(f))) == STEPS // 10

    assert main(["summary", "--json", str(a), str(b)]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert len(rows) == 1 and rows[0]["steps"] == STEPS and rows[0]["events"] == STEPS // 10
    assert rows[0]["files"] == [str(a), str(b)]
    assert "holds no run" not in captured.err
    assert main(["summary", str(a), str(b)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "holds no run" not in text and "a.stiff" in text and "b.stiff" in text

    src = ReplaySource([a, b])
    src.load()
    assert len(src.messages) == len(msgs)
    store = Store()
    src.seek(store, len(src.messages))
    assert len(store.runs["r1"].events) == STEPS // 10


def test_overlapping_partial_copies_union_cleanly(tmp_path: Path) -> None:
    """Two recordings each missing part of the run (one joins batches) give every row once."""

    def batch(seq: int, lo: int, hi: int) -> p.Columns:
        steps = np.arange(lo, hi)
        return p.Columns.from_columns(
            {"loss": steps * 0.5}, steps, 1000.0 + steps, run="r", seq=seq
        )

    hello = p.Hello(run="r", seq=0, step=0, t=999.0, name="x")
    first = [hello, batch(1, 0, 10), batch(2, 10, 20), batch(3, 20, 30)]
    joined = p.Columns.from_columns(
        {"loss": np.arange(20, 50) * 0.5},
        np.arange(20, 50),
        1000.0 + np.arange(20, 50),
        run="r",
        seq=5,
        batch_seqs=[3, 4, 5],
        batch_ends=[10, 20, 30],
    )
    a, b = tmp_path / "a.stiff", tmp_path / "b.stiff"
    write(a, first)
    write(b, [joined, batch(2, 10, 20)])
    msgs, merge = read_sessions([b, a])
    store = Store()
    store.extend(msgs, replay=True)
    loss = store.runs["r"].scalars["loss"]
    assert loss.steps.tolist() == list(range(50))
    assert np.array_equal(loss.values, np.arange(50) * 0.5)
    assert merge.reports[a].duplicates == 2 and merge.reports[b].duplicates == 0


# ------------------------------------------------------------------ (5) bad records


def _with_header(frames: list[bytes], **kw: object) -> list[bytes]:
    h = json.loads(frames[1])
    h.update(kw)
    return [frames[0], json.dumps(h).encode(), *frames[2:]]


def test_a_newer_protocol_version_is_named_by_every_tool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "v3.stiff"
    write(path, [_with_header(p.encode(m), v=3) for m in run_messages()])
    want = "protocol version 3 is newer than this stiffmon understands"

    assert main(["summary", str(path)]) == 2
    err = capsys.readouterr().err
    assert want in err and "upgrade stiffmon" in err
    assert main(["export", str(path), "--format", "csv", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert want in err and "upgrade stiffmon" in err
    assert main(["replay", str(path), "--screenshots", str(tmp_path / "shots")]) == 2
    err = capsys.readouterr().err
    assert want in err and "upgrade stiffmon" in err


@pytest.mark.parametrize(
    "bad",
    [
        {"v": 99},
        {"step": 2**63},
        "junk",
    ],
)
def test_one_bad_record_mid_file_is_counted_and_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: dict[str, object] | str
) -> None:
    msgs = run_messages()
    frames = [p.encode(m) for m in msgs]
    k = len(frames) // 2
    if isinstance(bad, dict):
        frames[k] = _with_header(frames[k], **bad)
    else:
        frames[k] = [frames[k][0], b"\xff\xfe not json"]
    path = tmp_path / "mid.stiff"
    write(path, frames)

    assert main(["summary", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "skipped 1" in out or "1 record skipped" in out
    assert main(["export", str(path), "--format", "csv", "--out", str(tmp_path / "x")]) == 0
    err = capsys.readouterr().err
    assert "skipped 1" in err or "1 record skipped" in err
    if bad == {"v": 99}:
        assert "protocol version 99 is newer" in err and "upgrade stiffmon" in err
    src = ReplaySource([path])
    src.load()
    store = Store()
    src.open(store)
    assert store.malformed == 1 and src.notes and len(src.messages) == len(msgs) - 1


# ------------------------------------------------------------------ (8) a crashed run's status


def test_a_run_without_a_bye_is_called_crashed_not_replay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crashed, done = tmp_path / "kill.stiff", tmp_path / "done.stiff"
    write(crashed, run_messages("k", bye=False))
    write(done, run_messages("d"))

    assert main(["summary", "--json", str(crashed), str(done)]) == 0
    rows = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["k"]["status"] == "no bye (crashed?)" and rows["k"]["state"] == "ended"
    assert rows["d"]["status"] == "finished"
    assert main(["summary", str(crashed)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "no bye (crashed?)" in text
    out = tmp_path / "x"
    assert main(["export", str(crashed), str(done), "--format", "csv", "--out", str(out)]) == 0
    with (out / "runs.csv").open() as f:
        status = {r["run"]: r["status"] for r in csv.DictReader(f)}
    assert status == {"k": "no bye (crashed?)", "d": "finished"}
