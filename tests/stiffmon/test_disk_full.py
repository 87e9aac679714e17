"""A disk that fills up (or a file deleted) while a session file is being written.

The OS refusing a write is simulated without root by ``RLIMIT_FSIZE``: a write past the limit
fails with ``EFBIG`` after writing what fits (``SIGXFSZ`` ignored), exactly as ``ENOSPC`` does on
a full disk; raising the soft limit again is the space coming back.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from stiffmon import protocol as p
from stiffmon import recorder
from stiffmon.session import SessionError, SessionWriter, read_session

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics")


def _msg(i: int) -> p.Message:
    common = {"run": "r", "seq": i, "step": i, "t": 1000.0 + i}
    if i % 2:
        return p.Matrix(**common, name="m", data=np.full((8, 8), i, np.float32))
    return p.Scalars.from_dict({"loss": 1.0 / (i + 1)}, **common)


@contextlib.contextmanager
def disk_full_at(size: int) -> Iterator[None]:
    """Writes past ``size`` bytes fail (EFBIG) inside the block; space returns after it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def test_a_refused_write_leaves_the_file_whole_and_the_same_record_can_be_written_later(
    tmp_path: Path,
) -> None:
    rec = tmp_path / "a.stiff"
    w = SessionWriter(rec)
    for i in range(5):
        w.write(_msg(i))
    size = rec.stat().st_size
    with disk_full_at(size + 40):  # the next record (a 8x8 matrix) fits only in part
        with pytest.raises(OSError):
            w.write(_msg(5))
        msgs, scan = read_session(rec)  # what a reader sees meanwhile (replay --follow)
        assert [m.seq for m in msgs] == [0, 1, 2, 3, 4]
        assert scan.ignored_bytes == 0, "a torn record was left in the file"
        assert w.failed_writes == 1
    w.write(_msg(5))  # space is back: the same record again, then the next
    w.write(_msg(6))
    w.close()
    msgs, scan = read_session(rec)
    assert [m.seq for m in msgs] == list(range(7)), "a record lost or written twice"
    assert scan.ignored_bytes == 0


def test_a_file_deleted_while_written_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = tmp_path / "a.stiff"
    w = SessionWriter(rec)
    w.write(_msg(0))
    rec.unlink()
    later = time.monotonic() + 2.0  # the once-a-second check is due
    monkeypatch.setattr("stiffmon.session.writer.time.monotonic", lambda: later)
    with pytest.raises(SessionError, match="deleted"):
        w.write(_msg(1))
    w.close()


class _FakeClient:
    """Gives the recorder ``n`` messages, a few per poll."""

    def __init__(self, n: int, on_poll: list[object]) -> None:
        self.msgs = [_msg(i) for i in range(n)]
        self.on_poll = on_poll
        self.polls = 0

        class Stats:
            malformed = 0

        self.stats = Stats()

    def __enter__(self) -> _FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def poll(self, timeout: float) -> list[tuple[p.Message, list[bytes]]]:
        self.polls += 1
        for hook in self.on_poll:
            hook(self.polls)  # type: ignore[operator]
        out, self.msgs = self.msgs[:3], self.msgs[3:]
        return [(m, [bytes(f) for f in p.encode(m)]) for m in out]

    def take_warnings(self) -> list[str]:
        return []

    def flush_pending(self) -> list[tuple[p.Message, list[bytes]]]:
        return []


def test_stiffmon_record_holds_messages_while_the_disk_is_full_and_writes_them_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = tmp_path / "r.stiff"
    full = contextlib.ExitStack()

    def weather(poll: int) -> None:
        if poll == 4:  # the disk fills after 9 messages, for 5 polls
            full.enter_context(disk_full_at(rec.stat().st_size + 10))
        if poll == 9:
            full.close()

    client = _FakeClient(40, [weather])
    monkeypatch.setattr(recorder, "Client", lambda *a, **k: client)
    monkeypatch.setattr(recorder, "RETRY_SECONDS", 0.0, raising=False)
    try:
        written, runs, _ = recorder.record(["tcp://x:1"], rec, stop=lambda: client.polls >= 16)
    finally:
        full.close()
    msgs, scan = read_session(rec)
    assert [m.seq for m in msgs] == list(range(40)), "messages lost while the disk was full"
    assert written == 40 and runs == {"r"}
    assert scan.ignored_bytes == 0
    err = capsys.readouterr().err
    assert "cannot write" in err and "holding what arrives in memory" in err
    assert "again: the messages held were written" in err


def test_stiffmon_record_says_what_it_could_not_write_when_it_ends_with_the_disk_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = tmp_path / "r.stiff"
    full = contextlib.ExitStack()

    def weather(poll: int) -> None:
        if poll == 3:
            full.enter_context(disk_full_at(rec.stat().st_size + 10))

    client = _FakeClient(30, [weather])
    monkeypatch.setattr(recorder, "Client", lambda *a, **k: client)
    try:
        with pytest.raises(OSError, match=r"24 message\(s\) received were not written") as info:
            recorder.record(["tcp://x:1"], rec, stop=lambda: client.polls >= 12)
    finally:
        full.close()
    assert info.value.filename == str(rec)  # `stiffmon record` names the file, no traceback
    msgs, scan = read_session(rec)
    assert [m.seq for m in msgs] == list(range(6)) and scan.ignored_bytes == 0
