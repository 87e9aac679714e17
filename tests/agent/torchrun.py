"""Run a script under ``torchrun`` (gloo, CPU) from a test, and clean up after it.

torchrun starts its workers in sessions of their own, so killing the launcher's process group
would leave a hung worker running, holding the pipes: :func:`kill_tree` kills every process
below the launcher.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import GLOO_TEARDOWN, ROOT

ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'agent'}", "OMP_NUM_THREADS": "1"}
"""The workers' environment: the repository and the agent importable, one thread each."""


def kill_tree(root: int) -> None:
    """SIGKILL ``root`` and every process below it."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    todo, tree = [root], []
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += parents.get(pid, [])
    for pid in tree:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def run_ranks(script: Path, *args: str, world: int = 2, timeout: float = 120) -> str:
    """Run ``script`` with ``args`` on ``world`` ranks and return their stdout.

    Every rank must print ``rank r done``; the run must succeed, or fail only with gloo's abort
    in ``destroy_process_group`` after all the work (:data:`~tests.conftest.GLOO_TEARDOWN`).

    Raises:
        AssertionError: Otherwise (with the end of stderr), or after ``timeout`` seconds.
    """
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    proc = subprocess.Popen(
        [*launch, str(world), str(script), *args],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate(timeout=10)
        raise AssertionError(f"no end within {timeout} s:\n{out[-2000:]}\n{err[-3000:]}") from None
    done = all(f"rank {r} done" in out for r in range(world))
    assert done and (proc.returncode == 0 or GLOO_TEARDOWN in err), err[-3000:]
    return out
