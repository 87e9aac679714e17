"""Shared test configuration and fixtures."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
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

# A zmq Context left to the garbage collector in a reference cycle with its sockets hangs the
# process: the cycle's weak references (the context's socket set) are cleared before the
# finalizers run, so ``Context.__del__`` terminates a context whose sockets are still open, and
# ``zmq_ctx_term`` waits for them forever, in C, where no test timeout reaches. In the tests an
# unclosed context is never terminated by the collector: it is reported, naming where it was
# made, and fails the test during which it was collected.
_ZMQ_ORIGIN: dict[int, str] = {}
_ZMQ_LEAKS: list[str] = []
_zmq_init = zmq.Context.__init__


def _tracked_init(self: zmq.Context[Any], *args: Any, **kwargs: Any) -> None:
    _zmq_init(self, *args, **kwargs)
    _ZMQ_ORIGIN[id(self)] = (
        os.environ.get("PYTEST_CURRENT_TEST", "?")
        + "\n"
        + "".join(traceback.format_stack(limit=8)[:-1])
    )


def _reported_del(self: zmq.Context[Any]) -> None:
    origin = _ZMQ_ORIGIN.pop(id(self), "?")
    if not getattr(self, "_shadow", True) and not self.closed:
        _ZMQ_LEAKS.append(f"a zmq Context left unclosed to the garbage collector, made in {origin}")


zmq.Context.__init__ = _tracked_init  # type: ignore[method-assign]
zmq.Context.__del__ = _reported_del  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _no_zmq_context_to_the_collector() -> Iterator[None]:
    yield
    if _ZMQ_LEAKS:
        leaks = _ZMQ_LEAKS[:]
        _ZMQ_LEAKS.clear()
        pytest.fail("\n\n".join(leaks), pytrace=False)


def wait_for(cond: Callable[[], object], timeout: float = 10.0) -> bool:
    """Poll ``cond`` every 10 ms until it is true or ``timeout`` seconds have passed; whether it
    became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return bool(cond())


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """A ZeroMQ context, destroyed (linger 0) after the test."""
    c: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
def endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port_pair()}"


USER_REGISTRY = os.environ.get("STIFFMON_REGISTRY")
"""``$STIFFMON_REGISTRY`` as the session found it (None: unset, the default under the cache)."""

_SESSION_REGISTRY: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    """Point ``$STIFFMON_REGISTRY`` at a private directory for the whole session.

    Set here, before any test module is imported, it also reaches what runs outside a test
    (collection, module- and session-scoped fixtures, environments copied at import time) and
    every subprocess: no agent a test starts shows up in the user's ``stiffmon watch``.
    """
    d = Path(tempfile.mkdtemp(prefix="stiffmon-test-registry-"))
    _SESSION_REGISTRY.append(d)
    os.environ["STIFFMON_REGISTRY"] = str(d)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the session's registry and give ``$STIFFMON_REGISTRY`` back."""
    if not _SESSION_REGISTRY:
        return
    shutil.rmtree(_SESSION_REGISTRY.pop(), ignore_errors=True)
    if USER_REGISTRY is None:
        os.environ.pop("STIFFMON_REGISTRY", None)
    else:
        os.environ["STIFFMON_REGISTRY"] = USER_REGISTRY


@pytest.fixture(scope="session")
def session_registry() -> Path:
    """The session's private registry directory (see :func:`pytest_configure`)."""
    return _SESSION_REGISTRY[-1]


@pytest.fixture(autouse=True)
def _registry(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own agent registry (inside a test, this one, not the session's)."""
    d = tmp_path_factory.mktemp("registry")
    monkeypatch.setenv("STIFFMON_REGISTRY", str(d))
    return d


def default_sigint() -> None:
    """A child's ``preexec_fn``: SIGINT at its default, so that Python turns it into
    ``KeyboardInterrupt`` there. A test run started in the background by a non-interactive
    shell ignores SIGINT, every child inherits that, and Ctrl-C tests would wait for ever."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
            preexec_fn=default_sigint,
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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A context still in a cycle at the end is collected here, and reported too."""
    import gc

    gc.collect()
    if _ZMQ_LEAKS:
        print("\n\n".join(_ZMQ_LEAKS), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
