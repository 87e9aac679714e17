"""``stiffmon demo``: a learning-rate sweep on bundled data, each run its own training process.

The children run ``python -m stiffmon_agent.demo.train`` (needs ``stiffmon[demos]``: torch and
scikit-learn, whose bundled 8×8 digits are the data). Each publishes on its own loopback port and
records to ``<out>/<name>.stiff``; the monitor attaches to all of them, or, with ``--no-tui``, a
progress bar follows them and a summary table closes the sweep. Ctrl+C (or quitting the monitor)
stops every child cleanly: SIGINT, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stiffmon.transport import Endpoint, free_port_pair

DEFAULT_LRS = (0.01, 0.05, 0.2)


class DemoError(RuntimeError):
    """The demo cannot start (missing extras, bad options); the message says what to do."""


@dataclass(frozen=True)
class DemoRun:
    lr: float
    endpoint: Endpoint
    record: Path
    proc: subprocess.Popen[bytes]


def check_requirements() -> None:
    missing = [m for m in ("torch", "sklearn") if importlib.util.find_spec(m) is None]
    if missing:
        raise DemoError(
            f"stiffmon demo trains models and needs {', '.join(missing)}: "
            'pip install "stiffmon[demos]"'
        )


def parse_lrs(text: str | None, runs: int | None = None) -> list[float]:
    """The learning rates of the sweep: ``text``'s, else ``runs`` (default 3) spread ones.

    Raises:
        DemoError: Bad numbers, fewer than one run, or ``runs`` and ``text`` that disagree.
    """
    if text:
        try:
            lrs = [float(x) for x in text.split(",") if x.strip()]
        except ValueError as exc:
            raise DemoError(f"--lrs must be comma-separated numbers: {text!r}") from exc
        if not lrs or any(lr <= 0 for lr in lrs):
            raise DemoError("--lrs needs positive learning rates")
        if runs is not None and runs != len(lrs):
            raise DemoError(f"--runs {runs} but --lrs gives {len(lrs)} learning rates")
        return lrs
    if runs is None:
        runs = len(DEFAULT_LRS)
    if runs < 1:
        raise DemoError("--runs must be at least 1")
    if runs <= len(DEFAULT_LRS):
        return list(DEFAULT_LRS[:runs]) if runs > 1 else [0.05]
    lo, hi = 0.005, 0.3  # log-spaced between
    return [round(lo * (hi / lo) ** (i / (runs - 1)), 4) for i in range(runs)]


def start_runs(
    lrs: Sequence[float],
    out: Path,
    *,
    steps: int,
    model: str,
    label_noise: float,
    batch_size: int,
    momentum: float = 0.0,
    every: int = 20,
    publish: bool = True,
) -> list[DemoRun]:
    """Start one training process per learning rate."""
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for lr in lrs:
        port = free_port_pair() if publish else 0
        ep = Endpoint("127.0.0.1", port)
        record = out / f"lr{lr:g}{'-noise' + format(label_noise, 'g') if label_noise else ''}.stiff"
        if record.exists():
            record.unlink()  # a new sweep, not an append to an old one
        cmd = [
            sys.executable,
            "-m",
            "stiffmon_agent.demo.train",
            "--lr",
            str(lr),
            "--steps",
            str(steps),
            "--model",
            model,
            "--label-noise",
            str(label_noise),
            "--batch-size",
            str(batch_size),
            "--momentum",
            str(momentum),
            "--every",
            str(every),
            "--record",
            str(record),
            "--endpoint",
            ep.pub if publish else "",
        ]
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        runs.append(DemoRun(lr, ep, record, proc))
    return runs


def stop_runs(runs: Sequence[DemoRun], grace: float = 10.0) -> None:
    """SIGINT every child that still runs, wait ``grace`` seconds, then SIGKILL."""
    for r in runs:
        if r.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                r.proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    for r in runs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            r.proc.wait(max(0.1, deadline - time.monotonic()))
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait(5)
        if r.proc.stderr:
            r.proc.stderr.close()


def failures(runs: Sequence[DemoRun]) -> list[str]:
    out = []
    for r in runs:
        if r.proc.returncode not in (0, None, -signal.SIGINT, 130):
            err = r.proc.stderr.read().decode(errors="replace")[-2000:] if r.proc.stderr else ""
            out.append(f"run lr={r.lr:g} exited with {r.proc.returncode}:\n{err}")
    return out


def run_headless(runs: Sequence[DemoRun], steps: int) -> None:
    """Progress bars from the recorded files until every child has finished."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from stiffmon.protocol import PER_STEP_KINDS
    from stiffmon.session import SessionError, SessionReader

    offsets = {r.record: 0 for r in runs}
    done = {r.record: 0 for r in runs}
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    ) as progress:
        tasks = {r.record: progress.add_task(f"lr={r.lr:g}", total=steps) for r in runs}
        while True:
            alive = [r for r in runs if r.proc.poll() is None]
            for r in runs:
                if not r.record.exists():
                    continue
                try:
                    reader = SessionReader(r.record)
                    for m in reader.messages(offsets[r.record] or 12, on_error="skip"):
                        if m.KIND in PER_STEP_KINDS:
                            done[r.record] = max(done[r.record], m.step + 1)
                    if reader.last_scan is not None:
                        offsets[r.record] = reader.last_scan.end
                except SessionError:
                    continue
                progress.update(tasks[r.record], completed=min(done[r.record], steps))
            if not alive:
                break
            time.sleep(0.3)


def run_demo(
    *,
    runs: int | None = None,
    lrs: str | None = None,
    steps: int | None = None,
    model: str = "mlp",
    label_noise: float = 0.0,
    no_tui: bool = False,
    out: str | None = None,
    batch_size: int = 64,
    momentum: float = 0.0,
    ascii: bool = False,
    every: int = 20,
) -> int:
    check_requirements()
    lr_list = parse_lrs(lrs, runs)
    n_steps = steps if steps is not None else (3000 if model == "mlp" else 1200)
    if n_steps < 1:
        raise DemoError("--steps must be at least 1")
    out_dir = Path(out or f"stiffmon-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    children = start_runs(
        lr_list,
        out_dir,
        steps=n_steps,
        model=model,
        label_noise=label_noise,
        batch_size=batch_size,
        momentum=momentum,
        every=every,
    )
    print(
        f"stiffmon demo: {len(children)} runs (η = {', '.join(f'{lr:g}' for lr in lr_list)}), "
        f"{model}, {n_steps} steps\n  recording to {out_dir}/",
        file=sys.stderr,
    )
    try:
        if no_tui:
            run_headless(children, n_steps)
        else:
            from stiffmon.tui.app import StiffmonApp
            from stiffmon.tui.sources import LiveSource

            StiffmonApp(live=LiveSource([c.endpoint for c in children]), ascii=ascii).run()
    except KeyboardInterrupt:
        print("stiffmon demo: interrupted, stopping the runs", file=sys.stderr)
    finally:
        stop_runs(children)
    problems = failures(children)
    for p in problems:
        print(f"stiffmon demo: {p}", file=sys.stderr)
    _print_summary([c.record for c in children if c.record.exists()])
    print(
        f"stiffmon demo: sessions in {out_dir}/\n  replay with: stiffmon replay {out_dir}/*.stiff",
        file=sys.stderr,
    )
    return 1 if problems else 0


def _print_summary(files: Sequence[Path]) -> None:
    from rich.console import Console

    from stiffmon.session import SessionReader
    from stiffmon.store import Store
    from stiffmon.summary import summary_table

    store = Store()
    for f in files:
        store.extend(SessionReader(f).messages(on_error="skip"), replay=True)
    if store.runs:
        Console(stderr=True).print(summary_table(store))
