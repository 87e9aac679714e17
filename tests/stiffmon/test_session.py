"""Tests for stiffmon.session: .stiff writer/reader, torn tails, follow, index, SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stiffmon import protocol as p
from stiffmon import session as s
from tests.conftest import wait_for
from tests.stiffmon.strategies import any_message


def make_messages(n: int, run: str = "r1", step0: int = 0) -> list[p.Message]:
    out: list[p.Message] = []
    for i in range(n):
        common = {"run": run, "seq": i, "step": step0 + i, "t": 1000.0 + i}
        if i % 3 == 0:
            out.append(p.Scalars.from_dict({"loss": 1.0 / (i + 1), "lr": 0.1}, **common))
        elif i % 3 == 1:
            out.append(p.Matrix(**common, name="m", data=np.full((3, 3), i, np.float32)))
        else:
            out.append(p.Event(**common, level="info", code="c", message=f"event {i} ✓"))
    return out


def write_file(path: Path, msgs: list[p.Message]) -> list[int]:
    """Write messages and return each record's end offset."""
    ends = []
    with s.SessionWriter(path) as w:
        for m in msgs:
            w.write(m)
            ends.append(w._f.tell())
    return ends


def test_round_trip(tmp_path: Path) -> None:
    msgs = make_messages(30)
    path = tmp_path / "a.stiff"
    write_file(path, msgs)
    assert path.read_bytes()[:8] == s.MAGIC
    reader = s.SessionReader(path)
    assert list(reader) == msgs
    assert reader.ignored_bytes == 0
    assert reader.last_scan is not None and reader.last_scan.state == "clean"


def test_records_hold_exactly_the_wire_frames(tmp_path: Path) -> None:
    msgs = make_messages(5)
    path = tmp_path / "a.stiff"
    write_file(path, msgs)
    got = [frames for _, frames in s.SessionReader(path).records()]
    assert got == [p.encode(m) for m in msgs]


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msgs=st.lists(any_message, max_size=6))
def test_round_trip_any_messages(tmp_path: Path, msgs: list[p.Message]) -> None:
    path = tmp_path / "h.stiff"
    path.unlink(missing_ok=True)
    write_file(path, msgs)
    assert list(s.SessionReader(path)) == msgs


def test_every_truncation_reads_the_intact_prefix(tmp_path: Path) -> None:
    msgs = make_messages(6)
    full = tmp_path / "full.stiff"
    ends = write_file(full, msgs)
    data = full.read_bytes()
    cut_file = tmp_path / "cut.stiff"
    for cut in range(s.HEADER_SIZE, len(data) + 1):
        cut_file.write_bytes(data[:cut])
        reader = s.SessionReader(cut_file)
        got = list(reader)
        n_intact = sum(1 for e in ends if e <= cut)
        assert got == msgs[:n_intact], cut
        intact_end = ends[n_intact - 1] if n_intact else s.HEADER_SIZE
        assert reader.ignored_bytes == cut - intact_end
        assert reader.last_scan is not None
        assert reader.last_scan.state == ("clean" if cut == intact_end else "truncated")


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bit_flips_skip_only_the_damaged_record(tmp_path: Path, data: st.DataObject) -> None:
    """A flipped bit damages one record: the others are read, the damage said (a flip in the
    last record is a torn tail)."""
    msgs = make_messages(8)
    path = tmp_path / "flip.stiff"
    path.unlink(missing_ok=True)
    ends = write_file(path, msgs)
    raw = bytearray(path.read_bytes())
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(raw))
    byte = bit // 8
    if byte < s.HEADER_SIZE:
        with pytest.raises(s.SessionError):
            s.SessionReader(path)
        return
    reader = s.SessionReader(path)
    got = list(reader)
    k = sum(1 for e in ends if e <= byte)  # the damaged record
    start = ends[k - 1] if k else s.HEADER_SIZE
    if k == len(msgs) - 1:  # nothing intact after it: a torn tail
        assert got == msgs[:k] and reader.ignored_bytes == len(raw) - start
        assert reader.damaged == {}
    else:
        assert got == msgs[:k] + msgs[k + 1 :] and reader.ignored_bytes == 0
        assert reader.damaged == {start: ends[k] - start}
    index = s.SessionReader(path).index()
    assert len(index) == len(got)


def test_wrong_magic_and_version(tmp_path: Path) -> None:
    bad = tmp_path / "bad.stiff"
    bad.write_bytes(b"PK\x03\x04 not a session at all")
    with pytest.raises(s.SessionError, match="not a stiffmon session file"):
        s.SessionReader(bad)
    newer = tmp_path / "newer.stiff"
    newer.write_bytes(s.MAGIC + (7).to_bytes(4, "little"))
    with pytest.raises(s.SessionVersionError, match=r"version 7.*reads version 1"):
        s.SessionReader(newer)
    short = tmp_path / "short.stiff"
    short.write_bytes(s.MAGIC[:3])
    with pytest.raises(s.SessionError, match="too short"):
        s.SessionReader(short)
    tiny = tmp_path / "tiny.stiff"
    tiny.write_bytes(b"hi")
    with pytest.raises(s.SessionError, match="not a stiffmon session file"):
        s.SessionReader(tiny)


def test_writer_refuses_a_foreign_file(tmp_path: Path) -> None:
    other = tmp_path / "notes.txt"
    other.write_bytes(b"my thesis, do not overwrite")
    with pytest.raises(s.SessionError):
        s.SessionWriter(other)
    assert other.read_bytes() == b"my thesis, do not overwrite"
    tiny = tmp_path / "tiny.txt"
    tiny.write_bytes(b"hi")
    with pytest.raises(s.SessionError):
        s.SessionWriter(tiny)
    assert tiny.read_bytes() == b"hi"


def test_writer_appends_after_cutting_a_torn_tail(tmp_path: Path) -> None:
    msgs = make_messages(6)
    path = tmp_path / "a.stiff"
    ends = write_file(path, msgs[:4])
    with open(path, "ab") as f:  # a crashed writer's half record
        f.write(s.pack_record(p.encode(msgs[4]))[:-5])
    with s.SessionWriter(path) as w:
        assert w.recovered_bytes > 0
        assert w._f.tell() == ends[-1]
        w.write(msgs[4])
        w.write(msgs[5])
    assert list(s.SessionReader(path)) == msgs


@pytest.mark.parametrize("fsync", ["never", "always", 0.0, 5])
def test_fsync_policies(tmp_path: Path, fsync: s.FsyncPolicy) -> None:
    path = tmp_path / "f.stiff"
    with s.SessionWriter(path, fsync=fsync) as w:
        for m in make_messages(3):
            w.write(m)
    assert len(list(s.SessionReader(path))) == 3
    with pytest.raises(ValueError, match="fsync"):
        s.SessionWriter(tmp_path / "g.stiff", fsync="sometimes")  # type: ignore[arg-type]


def test_intact_record_that_is_not_a_message(tmp_path: Path) -> None:
    path = tmp_path / "a.stiff"
    msgs = make_messages(2)
    with s.SessionWriter(path) as w:
        w.write(msgs[0])
        w.write_frames([b"r1/bye", b"{not json"])
        w.write(msgs[1])
    with pytest.raises(s.SessionError, match="offset"):
        list(s.SessionReader(path))
    reader = s.SessionReader(path)
    assert list(reader.messages(on_error="skip")) == msgs
    assert reader.skipped_records == 1


def test_newer_protocol_inside_a_session_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "a.stiff"
    frames = p.encode(p.Bye(run="r", seq=0, step=0, t=0.0, reason="x"))
    frames[1] = frames[1].replace(f'"v": {p.PROTOCOL_VERSION}'.encode(), b'"v": 9')
    with s.SessionWriter(path) as w:
        w.write_frames(frames)
    with pytest.raises(s.SessionError, match="protocol version 9"):
        list(s.SessionReader(path))


def test_index_seeks_by_step(tmp_path: Path) -> None:
    path = tmp_path / "a.stiff"
    msgs = make_messages(50, step0=100)
    write_file(path, msgs)
    reader = s.SessionReader(path)
    index = reader.index()
    assert len(index) == 50
    np.testing.assert_array_equal(index.steps, np.arange(100, 150))
    for step in (0, 100, 101, 123, 149):
        first = next(reader.messages(index.offset_for_step(step)))
        assert first.step == max(step, 100)
    assert index.offset_for_step(150) == index.end
    assert list(reader.messages(index.end)) == []


def test_index_with_interleaved_runs_and_restart(tmp_path: Path) -> None:
    path = tmp_path / "a.stiff"
    a = make_messages(10, run="a", step0=0)
    b = make_messages(10, run="b", step0=0)  # a restarted run starts at step 0 again
    interleaved = [m for pair in zip(a, b, strict=True) for m in pair]
    write_file(path, interleaved)
    index = s.SessionReader(path).index()
    assert np.all(np.diff(index.reach) >= 0)
    first = next(s.SessionReader(path).messages(index.offset_for_step(5)))
    assert first.step == 5 and first.run == "a"


def test_follow_a_growing_file(tmp_path: Path) -> None:
    path = tmp_path / "live.stiff"
    msgs = make_messages(20)
    w = s.SessionWriter(path)
    record = s.pack_record(p.encode(msgs[10]))

    def writer() -> None:
        for i, m in enumerate(msgs):
            if i == 10:  # write one record in two pieces, as a slow writer might
                w._f.write(record[:7])
                w._f.flush()
                time.sleep(0.15)
                w._f.write(record[7:])
                w._f.flush()
            else:
                w.write(m)
            time.sleep(0.01)
        w.close()

    t = threading.Thread(target=writer)
    t.start()
    got = list(s.SessionReader(path).follow(poll_interval=0.02, idle_timeout=1.0))
    t.join(5)
    assert got == msgs


def test_follow_stops_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "live.stiff"
    write_file(path, make_messages(3))
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) >= 2

    got = list(s.SessionReader(path).follow(poll_interval=0.01, stop=stop))
    assert len(got) == 3 and len(calls) == 2


def test_read_session_helper(tmp_path: Path) -> None:
    path = tmp_path / "a.stiff"
    msgs = make_messages(4)
    write_file(path, msgs)
    with open(path, "ab") as f:
        f.write(b"\x01\x02\x03")
    got, scan = s.read_session(path)
    assert got == msgs and scan.ignored_bytes == 3 and scan.state == "truncated"


_KILL_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from stiffmon import protocol as p
    from stiffmon.session import SessionWriter

    w = SessionWriter(sys.argv[1])
    i = 0
    while True:
        data = np.full((256, 256), i, dtype=np.float64)  # 512 KiB records: kills land mid-write
        w.write(p.Matrix(run="k", seq=i, step=i, t=float(i), name="m", data=data))
        if i == 0:
            print("started", flush=True)
        i += 1
    """
)


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.5])
def test_sigkill_mid_write_leaves_a_readable_prefix(tmp_path: Path, delay: float) -> None:
    path = tmp_path / "killed.stiff"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_WRITER, str(path)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"started"
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    reader = s.SessionReader(path)
    got = list(reader)
    assert len(got) >= 1
    for i, m in enumerate(got):
        assert isinstance(m, p.Matrix) and m.seq == i
        assert m.data.shape == (256, 256) and np.all(m.data == i)
    assert reader.last_scan is not None
    record_size = len(s.pack_record(p.encode(got[0])))
    assert reader.ignored_bytes < record_size
    # a writer reopening the file continues the session cleanly
    with s.SessionWriter(path) as w:
        assert w.recovered_bytes == reader.ignored_bytes
        w.write(p.Bye(run="k", seq=len(got), step=len(got), t=0.0, reason="resumed"))
    again = list(s.SessionReader(path))
    assert again[:-1] == got and isinstance(again[-1], p.Bye)


# ------------------------------------------------------------------ hostile and rewritten files


def test_skip_goes_past_an_intact_record_whose_frames_do_not_tile(tmp_path: Path) -> None:
    path = tmp_path / "a.stiff"
    msgs = make_messages(40)
    with s.SessionWriter(path) as w:
        w.write(msgs[0])
        payload = b"\x05\x00\x00\x00abc"  # says 5 bytes, holds 3: a valid CRC, untileable frames
        w._f.write(s._REC.pack(len(payload), zlib.crc32(payload)) + payload)
        for m in msgs[1:]:
            w.write(m)
    with pytest.raises(s.SessionError, match="overruns"):
        list(s.SessionReader(path))
    reader = s.SessionReader(path)
    assert list(reader.messages(on_error="skip")) == msgs  # all 39 after it are reachable
    assert reader.skipped_records == 1 and reader.last_scan is not None
    assert reader.last_scan.state == "clean"


def test_index_reads_the_step_after_a_256_byte_run_id(tmp_path: Path) -> None:
    path = tmp_path / "long.stiff"
    run = "r" * 256
    msgs = [p.Bye(run=run, seq=i, step=10 * i, t=0.0, reason="x" * 300) for i in range(5)]
    write_file(path, msgs)
    index = s.SessionReader(path).index()
    assert index.steps.tolist() == [0, 10, 20, 30, 40]
    assert next(s.SessionReader(path).messages(index.offset_for_step(25))).step == 30


def test_index_survives_a_record_with_a_step_beyond_int64(tmp_path: Path) -> None:
    path = tmp_path / "big.stiff"
    good = p.encode(p.Bye(run="r", seq=0, step=7, t=0.0, reason="x"))
    forged = [good[0], good[1].replace(b'"step": 7', b'"step": 9223372036854775808')]
    with s.SessionWriter(path) as w:
        w.write_frames(good)
        w.write_frames(forged)
        w.write(p.Bye(run="r", seq=2, step=9, t=0.0, reason="x"))
    reader = s.SessionReader(path)
    assert reader.index().steps.tolist() == [7, 7, 9]  # the forged one inherits the last step
    assert [m.step for m in reader.messages(on_error="skip")] == [7, 9]
    assert reader.skipped_records == 1


def _follow_in_thread(path: Path, got: list[p.AnyMessage]) -> tuple[threading.Thread, list[int]]:
    done = threading.Event()
    restarts: list[int] = []

    def run() -> None:
        reader = s.SessionReader(path)
        for m in reader.follow(poll_interval=0.01, stop=done.is_set):
            got.append(m)
        restarts.append(reader.restarts)

    t = threading.Thread(target=run)
    t.start()
    t.done = done  # type: ignore[attr-defined]
    return t, restarts


@pytest.mark.parametrize("how", ["truncate", "rotate"])
@pytest.mark.parametrize("bigger", [False, True])
def test_follow_restarts_on_a_truncated_or_replaced_file(
    tmp_path: Path, how: str, bigger: bool
) -> None:
    path = tmp_path / "live.stiff"
    first = make_messages(30, run="old")
    write_file(path, first)
    got: list[p.AnyMessage] = []
    t, restarts = _follow_in_thread(path, got)
    try:
        assert wait_for(lambda: len(got) == 30)
        if how == "rotate":
            path.rename(tmp_path / "live.stiff.1")
        else:
            with open(path, "r+b") as f:
                f.truncate(0)
        # new content: other record sizes, more of them than were there before
        n = 300 if bigger else 20
        new = [
            p.Scalars.from_dict(
                {f"v{j}": 1.0 for j in range(i % 7)}, run="new", seq=i, step=i, t=1.0
            )
            for i in range(n)
        ]
        with s.SessionWriter(path) as w:
            for m in new:
                w.write(m)
        assert wait_for(lambda: len(got) == 30 + n)
    finally:
        t.done.set()  # type: ignore[attr-defined]
        t.join(10)
    assert got == [*first, *new]
    assert restarts == [1]


def test_follow_says_so_when_the_file_becomes_something_else(tmp_path: Path) -> None:
    path = tmp_path / "live.stiff"
    write_file(path, make_messages(3))
    reader = s.SessionReader(path)
    it = reader.follow(poll_interval=0.01, idle_timeout=5)
    assert len([next(it) for _ in range(3)]) == 3
    path.unlink()
    path.write_bytes(b"GIF89a not a session at all")
    with pytest.raises(s.SessionError, match="not a stiffmon session"):
        next(it)


def test_follow_waits_while_the_file_is_gone_and_picks_up_its_successor(tmp_path: Path) -> None:
    path = tmp_path / "live.stiff"
    first = make_messages(5, run="old")
    write_file(path, first)
    reader = s.SessionReader(path)
    follower = reader.follow(poll_interval=0.01, idle_timeout=5)
    assert [next(follower) for _ in first] == first
    path.unlink()  # rotated away; the successor does not exist yet
    second = make_messages(3, run="new")

    def recreate() -> None:
        time.sleep(0.2)  # the follower polls the missing path meanwhile
        write_file(path, second)

    t = threading.Thread(target=recreate)
    t.start()
    try:
        assert [next(follower) for _ in second] == second  # no FileNotFoundError
    finally:
        t.join()
    assert reader.restarts == 1
