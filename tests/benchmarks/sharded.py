"""[6] of ``tests.benchmarks.agent``: sharded measurement, 1 process vs 2, and what the machine
allows.

A measurement split over W processes can take ~1/W of one process's time only where the W
processes run at one process's speed each. :func:`machine_ceiling` measures that for the two
kinds of work the measurements are made of: dense products (the Gram's rows against each other:
floating-point bound) and Python-heavy, small-kernel code (a Hessian-vector product's autograd
graph on a small model is mostly that). Where the cores share their floating-point units (two
hyperthreads of one core, say), W processes of products run at ~1/W of the speed each, and the
best a split can give for such work is the ratio printed as its ceiling.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from tests.conftest import GLOO_TEARDOWN

_WORKER_ERRORS = ("terminate", "what()", "Error", "error:", "Abort", "Traceback", "Signal")

# One process of the ceiling's test: warm up, say so, wait for the common start, time the work.
_PROBE = """
import sys, time
kind = sys.argv[1]
if kind == "products":
    import torch
    torch.set_num_threads(1)
    a, b = torch.randn(256, 16384), torch.randn(16384, 256)
    def work():
        for _ in range(25):
            a @ b
else:
    def work():
        s = 0
        for i in range(1_500_000):
            s += i
work()
print("ready", flush=True)
sys.stdin.readline()
t = time.perf_counter()
work()
print(time.perf_counter() - t)
"""


def machine_ceiling(world: int, kind: str) -> float:
    """Speed of each of ``world`` processes doing ``kind`` (``"products"`` or ``"python"``) at
    once, relative to one process alone (1.0: a core each; 1/world: one core's worth shared)."""

    def run(n: int) -> float:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _PROBE, kind],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for _ in range(n)
        ]
        for p in procs:  # every one imported and warmed up before any starts
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        times = [float(p.communicate(timeout=300)[0]) for p in procs]
        return statistics.median(times)

    alone = min(run(1) for _ in range(2))
    return alone / statistics.median(run(world) for _ in range(2))


def sharded_times(world: int, repeats: int, per_class: int, channels: int) -> dict[str, float]:
    """Median seconds of each measurement kind with ``world`` processes (rank 0's wall time),
    one launch per kind."""
    out: dict[str, float] = {}
    for kind in ("gram", "sharpness", "density"):
        out.update(_sharded_time(world, repeats, per_class, channels, kind))
    return out


def _sharded_time(
    world: int, repeats: int, per_class: int, channels: int, kind: str
) -> dict[str, float]:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'agent'}"}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    # --standalone: the rendezvous binds a free port itself (a port picked here and released
    # could be taken by another process before the group binds it)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(world)]
    cmd += ["-m", "tests.benchmarks.sharded_worker", str(repeats), str(per_class), str(channels)]
    cmd.append(kind)
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    line = next((x for x in run.stdout.splitlines() if x.startswith("{")), None)
    teardown = line is not None and GLOO_TEARDOWN in run.stderr  # gloo's, after all the work
    if (run.returncode and not teardown) or line is None:  # the workers' errors, the launcher's
        said = [x for x in run.stderr.splitlines() if any(w in x for w in _WORKER_ERRORS)]
        raise RuntimeError(
            f"sharded benchmark failed (exit {run.returncode}):\n"
            + "\n".join(said[:40])
            + f"\n...\n{run.stderr[-2000:]}"
        )
    return json.loads(line)  # type: ignore[no-any-return]


def _ceiling(when: str) -> None:
    speed = {kind: machine_ceiling(2, kind) for kind in ("products", "python")}
    print(f"\n[6] what 2 processes get on this machine {when} (1 thread each, at once vs alone):")
    for kind, what in (("products", "dense products"), ("python", "a Python loop")):
        print(
            f"    {what:14s}: each at {speed[kind]:.2f}x the speed of one alone: work split in "
            f"two can take {1 / (2 * speed[kind]):.2f} of one process's time at best"
        )


def report(quick: bool) -> None:
    """Print [6]: each measurement's time with 1 and 2 processes, between two readings of what
    2 processes get on the machine (its cores' share can change while it runs: a VM's)."""
    _ceiling("before")
    repeats = 2 if quick else 5
    for per_class, channels in ((20, 16),) if quick else ((20, 16), (50, 32)):
        one = sharded_times(1, repeats, per_class, channels)
        two = sharded_times(2, repeats, per_class, channels)
        print(
            f"\n[6] sharded measurement, demo CNN ({channels} channels), probe of {one['n']} "
            f"examples, median of {repeats}, 1 process vs 2 gloo processes (OMP threads 1 each), "
            "one kind per launch"
        )
        for kind in ("gram", "sharpness", "density"):
            print(
                f"    {kind:9s}: {one[kind] * 1e3:8.0f} ms  vs  {two[kind] * 1e3:8.0f} ms: "
                f"ratio {two[kind] / one[kind]:.2f}  (target ~0.5 with a core per process)"
            )
    _ceiling("after")
