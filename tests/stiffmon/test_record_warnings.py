"""``stiffmon record`` says the client's warnings on stderr as they come (an ssh tunnel that
exited and came back); before, only the monitor's screen collected them, and a headless
recorder over ssh://… restarted its tunnel eight times without a word."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from stiffmon import recorder


class _Client:
    """Receives nothing; has one tunnel warning at its second poll."""

    def __init__(self, endpoints: Any, curve: Any = None) -> None:
        self.polls = 0
        self.stats = SimpleNamespace(malformed=0)

    def __enter__(self) -> _Client:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def poll(self, timeout: float) -> list[Any]:
        self.polls += 1
        return []

    def take_warnings(self) -> list[str]:
        return ["ssh://gpu-box:7000: ssh exited (255); connecting again in 1 s"] * (self.polls == 2)

    def flush_pending(self) -> list[Any]:
        return []


def test_the_clients_warnings_reach_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(recorder, "Client", _Client)
    calls = iter(range(5))
    recorder.record(["tcp://127.0.0.1:1"], tmp_path / "r.stiff", stop=lambda: next(calls) >= 4)
    err = capsys.readouterr().err
    assert err.count("stiffmon record: ssh://gpu-box:7000: ssh exited (255)") == 1, err
