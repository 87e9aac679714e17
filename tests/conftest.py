"""Shared test configuration and fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from stiffmon.transport import free_port_pair

# Timing varies a lot on shared 2-core CI machines: no per-example deadlines.
settings.register_profile("default", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

GLOO_TEARDOWN = "terminate called without an active exception"
"""What gloo prints when it aborts a rank in ``destroy_process_group`` after all the work (under
load, rarely, even after a barrier); the distributed tests tolerate only that."""

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port_pair()}"


@pytest.fixture(autouse=True)
def _registry(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own agent registry."""
    d = tmp_path_factory.mktemp("registry")
    monkeypatch.setenv("STIFFMON_REGISTRY", str(d))
    return d


class Procs:
    """Subprocesses started by a test; killed at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "agent")]),
                **(env or {}),
            },
        )
        self.procs.append(proc)
        return proc


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    for proc in p.procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()
