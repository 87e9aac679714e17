"""The test session never publishes into the user's run registry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from stiffmon.registry import registry_dir
from tests.conftest import ROOT, USER_REGISTRY

AT_IMPORT = dict(os.environ)
"""The environment as this module is imported (at collection, before any fixture)."""


def users_registry() -> Path:
    """Where ``stiffmon watch`` outside the tests looks for local runs."""
    if USER_REGISTRY:
        return Path(USER_REGISTRY)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "stiffmon" / "runs"


def test_the_registry_at_collection_is_the_sessions(session_registry: Path) -> None:
    assert AT_IMPORT.get("STIFFMON_REGISTRY") == str(session_registry)
    assert session_registry.is_dir() and session_registry != users_registry()


def test_a_test_has_its_own_registry(_registry: Path, session_registry: Path) -> None:
    assert registry_dir() == _registry
    assert registry_dir() not in (users_registry(), session_registry)


def test_a_subprocess_with_an_environment_copied_at_import_is_private(
    session_registry: Path,
) -> None:
    # like a module-level ``ENV = {**os.environ, ...}`` handed to Popen
    out = subprocess.run(
        [sys.executable, "-c", "from stiffmon.registry import registry_dir; print(registry_dir())"],
        cwd=ROOT,
        env={**AT_IMPORT, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert Path(out) == session_registry != users_registry()
