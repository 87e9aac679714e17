"""SIGTERM for agents made only in worker threads (Optuna ``n_jobs``, a ThreadPoolExecutor).

Python sets signal handlers from the main thread only: an agent made in a worker cannot install
its flush-on-SIGTERM handler, and a ``kill`` ended the process without the last steps or a bye.
``termination.flush_on_sigterm()``, called in the main thread before the trials start, installs
it for the agents made later in any thread; without it a worker's agent says so on the console.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stiffmon import protocol as p
from stiffmon.session import read_session

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, threading, torch
    from torch import nn
    from stiffmon_agent import Agent, termination

    if sys.argv[2] == "flush":
        assert termination.flush_on_sigterm()

    def trial(i):
        torch.manual_seed(i)
        m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
        x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 2, (12,))
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        a = Agent(m, nn.CrossEntropyLoss(), opt, probe=(x, y), endpoint="", registry=False,
                  record=f"{sys.argv[1]}/t{i}.stiff", gram_every=1, sharpness_every=1,
                  overhead_cap=None, batch_interval=60.0, idle_batch_interval=60.0)
        for _ in range(4):
            loss = nn.functional.cross_entropy(m(x), y)
            opt.zero_grad(); loss.backward(); opt.step(); a.step(loss)

    ts = [threading.Thread(target=trial, args=(i,), name=f"trial-{i}") for i in range(2)]
    [t.start() for t in ts]; [t.join() for t in ts]
    os.kill(os.getpid(), signal.SIGTERM)  # agents still open, their steps still queued
    """
)


@pytest.mark.parametrize("mode", ["flush", "plain"])
def test_agents_made_in_threads_flush_on_sigterm_when_asked(tmp_path: Path, mode: str) -> None:
    script = tmp_path / "trials.py"
    script.write_text(SCRIPT)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), mode],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == -signal.SIGTERM, done.stderr
    if mode == "plain":
        assert "flush_on_sigterm()" in done.stderr, "a worker's agent says what it cannot do"
        return
    for i in range(2):
        msgs = read_session(tmp_path / f"t{i}.stiff")[0]
        assert isinstance(msgs[-1], p.Bye) and msgs[-1].reason == "terminated"
        steps = {int(s) for m in msgs if isinstance(m, p.Columns) for s in m.steps}
        assert steps == set(range(4)), "every step written before the process died"
