"""Agent benchmarks: ``python -m tests.benchmarks.agent [--quick]``.

Prints, measured side by side in one run (the per-step-message figures are the baseline: the
publisher still accepts version-1 per-step ``scalars`` items, so the old path runs in the same
process):

1. ``agent.step()`` when nothing is due: median µs per call (target ≤ 20 µs).
2. Whole-run overhead at the default schedule and overhead cap (2 %): wall time with the agent
   ÷ without, the median of interleaved pairs, on the demo CNN (digits, batch 64, ~2 ms steps, a
   2,000-step run of ~4 s and a 10,000-step run of ~20 s, the latter also at a 5 % cap, where
   more measurements fit; target ≤ 1.05) and
   on the same CNN with batch 2048, whose steps take ≥ 20 ms (the same probe, so measurements
   cost the same; target ≤ 1.02); the agent publishes (nobody subscribed, so it batches every
   0.5 s) and records. Also the publisher thread's CPU per step (heavy measurement messages
   included), for the 2,000-step run also with a subscriber connected (batches every 0.25 s:
   ~1 ms of CPU per wake of the thread beside a busy loop), with the accuracy and with the
   loss and lr alone (the stream's target: ≤ 10 µs per step). A third line has no
   probe: what the per-step stream alone costs (``--only-stream``: just that line and [3]–[5]).
   Each line says which measurements were made of those due (the cap skips the rest).
3. A tight loop of 100k ``agent.step(loss)`` calls, recording on: steps in the file and bytes per
   step (targets: all of them, ≤ 42 B), against per-step messages through the same queue.
4. Publisher CPU per step with a subscriber reading everything (target ≤ 10 µs), columnar
   batches against one message per step.
5. Snapshot for a late joiner: every step of a 1M-step history (target ≤ 1 s), against the old
   per-step history of 100k messages; and the same history with a ``scalars`` message after
   every 50-step batch, as due steps' coverage and ``Agent.log`` interleave in a real loop
   (each cuts the history's column chunk: 3.5 s in the session that added the line).
6. Sharded measurement: the median wall time of each heavy measurement (Gram, sharpness,
   density) on the demo CNN with its probe, under ``torchrun`` with 1 process (the one-process
   agent: the baseline) and with 2 gloo processes sharing the probe (``distributed=True``;
   target ~1/2 of the time where the machine has a core per process), after what 2 processes
   get on this machine (:mod:`tests.benchmarks.sharded`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import zmq
from torch import nn

from stiffmon import protocol as p
from stiffmon.client import Client
from stiffmon.session import SessionReader
from stiffmon_agent import Agent
from stiffmon_agent.demo.data import load_digits_split
from stiffmon_agent.demo.models import digits_cnn
from stiffmon_agent.outgoing import Outgoing
from tests.benchmarks import sharded
from tests.conftest import free_port_pair


def step_cost(n: int) -> float:
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    agent = Agent(
        model,
        nn.CrossEntropyLoss(),
        opt,
        endpoint=f"tcp://127.0.0.1:{free_port_pair()}",
        queue_size=n + 10,
    )
    loss = torch.tensor(0.5)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        agent.step(loss)
        samples.append(time.perf_counter_ns() - t0)
    agent.close()
    return statistics.median(samples) / 1e3


def train(
    steps: int,
    with_agent: bool,
    record: Path | None,
    *,
    channels: int = 16,
    batch: int = 64,
    probe: bool = True,
    cap: float | None = None,
    device: str = "cpu",
    watched: bool = False,
    accuracy: bool = True,
) -> tuple[float, float, str]:
    """(wall seconds, publisher CPU seconds, measurements done) for one run on the digits;
    ``cap``: the agent's ``overhead_cap`` (None: its default); on ``device`` (data, probe and
    batch indices there, the time taken after the device has finished); ``watched``: a
    subscriber is connected (the agent then sends its batches every 0.25 s, not 0.5 s);
    ``accuracy``: ``agent.step(loss, logits, targets)``, else ``agent.step(loss)``."""
    torch.manual_seed(0)
    data = load_digits_split(seed=0)
    model = digits_cnn(channels).to(device)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    probes = [
        tuple(t.to(device) for t in pr) if probe else None
        for pr in (data.probe_train, data.probe_val)
    ]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    agent = None
    if with_agent:
        agent = Agent(
            model,
            nn.CrossEntropyLoss(),
            opt,
            probe=probes[0],  # type: ignore[arg-type]
            val_probe=probes[1],  # type: ignore[arg-type]
            endpoint=f"tcp://127.0.0.1:{free_port_pair()}",
            record=record,
            batch_size=batch,
            registry=False,
            **({} if cap is None else {"overhead_cap": cap}),
        )
    ctx = sub = None
    if watched and agent is not None and agent.endpoint is not None:
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(agent.endpoint.pub)
        deadline = time.monotonic() + 10
        while agent.publisher is not None and not agent.publisher.subscriptions:
            if time.monotonic() > deadline:
                raise RuntimeError("the subscriber never reached the agent")
            time.sleep(0.01)
    g = torch.Generator(device=device).manual_seed(1)
    _synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        i = torch.randint(0, len(y_train), (batch,), generator=g, device=device)
        x, y = x_train[i], y_train[i]
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if agent is not None:
            agent.step(loss, *((out, y) if accuracy else ()))
    _synchronize(device)
    pub_cpu = 0.0
    done = ""
    if agent is not None:
        agent.close()
        pub_cpu = agent.publisher.cpu_seconds if agent.publisher else 0.0
        cov = agent._budget.coverage
        done = ", ".join(f"{k} {d}/{d + sk}" for k, (d, sk) in cov.items() if d + sk)
    if ctx is not None:
        ctx.destroy(linger=0)
    return time.perf_counter() - t0, pub_cpu, done


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def overhead(
    steps: int,
    pairs: int,
    d: Path,
    *,
    channels: int = 16,
    batch: int = 64,
    probe: bool = True,
    cap: float | None = None,
    device: str = "cpu",
) -> tuple[float, float, float, float, str]:
    """Median ratio over interleaved pairs (order alternating), median times, µs publisher/step,
    the measurements done in the last run."""
    ratios, bases, agents, pubs = [], [], [], []
    done = ""
    run = partial(train, channels=channels, batch=batch, device=device)
    run(max(steps // 10, 5), False, None)  # warm up
    run(max(steps // 10, 5), True, d / "warm.stiff", probe=probe, cap=cap)
    for i in range(pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        got = {
            w: run(steps, w, d / f"r{channels}-{i}.stiff" if w else None, probe=probe, cap=cap)
            for w in order
        }
        done = got[True][2]
        bases.append(got[False][0])
        agents.append(got[True][0])
        pubs.append(got[True][1] / steps * 1e6)
        ratios.append(got[True][0] / got[False][0])
    return (
        statistics.median(ratios),
        statistics.median(bases),
        statistics.median(agents),
        statistics.median(pubs),
        done,
    )


def tight_loop(n: int, d: Path, per_step_messages: bool) -> tuple[int, float, float]:
    """(steps in the file, bytes per step, loop seconds) for n back-to-back steps."""
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = d / f"tight-{per_step_messages}.stiff"
    # the version-1 publisher drained its queue every 0.1 s, watched or not
    idle = None if per_step_messages else 0.5
    agent = Agent(
        model,
        nn.CrossEntropyLoss(),
        opt,
        endpoint="",
        record=rec,
        registry=False,
        idle_batch_interval=idle,
    )
    pub = agent.publisher
    assert pub is not None
    losses = torch.linspace(2.0, 0.1, n)
    t0 = time.perf_counter()
    if per_step_messages:  # the version-1 stream: one message per step through the queue
        for i in range(n):
            raw = [losses[i], 0.1]
            pub.submit(
                Outgoing(
                    p.Scalars, i, time.time(), {"values_names": ["loss", "lr/0"], "values_raw": raw}
                )
            )
    else:
        for i in range(n):
            agent.step(losses[i])
    elapsed = time.perf_counter() - t0
    agent.close(timeout=60)
    steps = 0
    for m in SessionReader(rec).messages():
        if isinstance(m, p.Columns):
            steps += len(m)
        elif isinstance(m, p.Scalars) and "loss" in m.names:
            steps += 1
    return steps, rec.stat().st_size / n, elapsed


def publish_cost(n: int, per_step_messages: bool) -> tuple[float, float, int]:
    """(µs of publisher CPU per step, steps/s end to end, steps received) with a subscriber."""
    ep = f"tcp://127.0.0.1:{free_port_pair()}"
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = Agent(model, nn.CrossEntropyLoss(), opt, endpoint=ep, queue_size=n + 10, registry=False)
    client = Client([ep])
    got = 0
    deadline = time.monotonic() + 5
    while got == 0 and time.monotonic() < deadline:
        got += len(client.poll(0.1))  # the hello: connected
    pub = agent.publisher
    assert pub is not None
    cpu0 = pub.cpu_seconds
    t0 = time.perf_counter()
    for i in range(n):
        if per_step_messages:
            pub.submit(
                Outgoing(
                    p.Scalars,
                    i,
                    time.time(),
                    {"values_names": ["loss", "lr/0"], "values_raw": [1.0 / (i + 1), 0.1]},
                )
            )
        else:
            agent.step(1.0 / (i + 1))
    agent._columns.flush()
    seen = 0
    while seen < n and time.perf_counter() - t0 < 120:
        for m, _ in client.poll(0.05):
            seen += len(m) if isinstance(m, p.Columns) else int(m.kind == "scalars")
    elapsed = time.perf_counter() - t0
    client.close()
    agent.close()  # joins the thread: its last wake is counted (it counts a wake at its end)
    cpu = pub.cpu_seconds - cpu0
    return cpu / n * 1e6, seen / elapsed, seen


def snapshot_time(
    steps: int, per_step_messages: bool, side_every: int = 0
) -> tuple[float, int, int]:
    """(seconds, messages, steps) for a late joiner to receive the whole history;
    ``side_every``: a batch ends and an ``Agent.log`` message follows every that many steps (as
    the coverage scalars of a due step do in a real loop)."""
    ep = f"tcp://127.0.0.1:{free_port_pair()}"
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = Agent(
        model,
        nn.CrossEntropyLoss(),
        opt,
        endpoint=ep,
        queue_size=steps + 10,
        registry=False,
    )
    pub = agent.publisher
    assert pub is not None
    if per_step_messages:  # the version-1 history: every scalars message kept as it came
        pub._history.scalars.accepts = lambda msg: False  # type: ignore[method-assign]
    for i in range(steps):
        if per_step_messages:
            pub.submit(
                Outgoing(
                    p.Scalars,
                    i,
                    time.time(),
                    {"values_names": ["loss", "lr/0"], "values_raw": [0.5, 0.1]},
                )
            )
        else:
            agent.step(0.5)
            if side_every and i % side_every == side_every - 1:
                agent._columns.flush()
                agent.log(val=1.0)
    agent._columns.flush()
    seq = -2
    while pub._queue.qsize() or pub.seq != seq:  # until the publisher has handled everything
        seq = pub.seq
        time.sleep(0.3)
    t0 = time.perf_counter()
    client = Client([ep], snapshot_timeout=60)
    n = rows = 0
    while client.stats.snapshots == 0 and time.perf_counter() - t0 < 60:
        for m, _ in client.poll(0.05):
            n += 1
            rows += len(m) if isinstance(m, p.Columns) else int(m.kind == "scalars")
    elapsed = time.perf_counter() - t0
    client.close()
    agent.close()
    return elapsed, n, rows


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.agent",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (default: torch's choice); 1 is steadier on a busy machine",
    )
    ap.add_argument("--only-stream", action="store_true", help="[2] without a probe only")
    ap.add_argument(
        "--device",
        default="cpu",
        help="where [2] trains (e.g. cuda); with a GPU only [1] and [2] (not its 10,000-step "
        "lines) run, the rest is CPU work",
    )
    args = ap.parse_args()
    q = args.quick
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"stiffmon agent benchmark — torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {args.device}"
    )
    us = step_cost(2_000 if q else 20_000)
    print(f"\n[1] agent.step() with nothing due: median {us:.2f} µs  (target <= 20)")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        pairs = 5
        for label, steps, channels, batch, target, probe, cap in (
            ("demo CNN on digits, batch 64", 300 if q else 2000, 16, 64, 1.05, True, None),
            ("demo CNN on digits, batch 64", 0 if q else 10_000, 16, 64, 1.05, True, None),
            ("demo CNN on digits, batch 64", 0 if q else 10_000, 16, 64, 1.05, True, 0.05),
            ("demo CNN on digits, batch 2048", 20 if q else 150, 16, 2048, 1.02, True, None),
            ("demo CNN, batch 64, no probe", 300 if q else 1000, 16, 64, 1.05, False, None),
        ):
            if (args.only_stream and probe) or not steps:
                continue
            if args.device != "cpu" and steps == 10_000:  # the 2,000-step line says it there
                continue
            ratio, base, with_agent, pub, done = overhead(
                steps,
                pairs,
                d,
                channels=channels,
                batch=batch,
                probe=probe,
                cap=cap,
                device=args.device,
            )
            what = "default schedule" if probe else "the per-step stream only"
            what += "" if cap is None else f", overhead_cap={cap:g}"
            print(
                f"\n[2] whole run, {label}, {steps} steps, {what}, "
                f"median of {pairs} interleaved pairs"
            )
            print(
                f"    without agent {base:.2f} s ({base / steps * 1e3:.1f} ms/step), "
                f"with agent {with_agent:.2f} s: ratio {ratio:.3f}  (target <= {target}); "
                f"publisher CPU {pub:.1f} µs/step"
            )
            if done:
                print(f"    measurements made (done/due): {done}")
            if steps == 2000 and args.device == "cpu":
                print(
                    "    the same run with a monitor subscribed (batches every 0.25 s, not 0.5 s):"
                )
                for acc, what in ((True, "loss, lr and accuracy"), (False, "loss and lr only")):
                    cpu = statistics.median(
                        train(steps, True, d / "watched.stiff", watched=True, accuracy=acc)[1]
                        for _ in range(1 if q else 3)
                    )
                    print(
                        f"      {what:22s}: publisher CPU {cpu / steps * 1e6:.1f} µs/step "
                        "(median of 3; target <= 10 for the stream)"
                    )
        if args.device != "cpu":
            return
        n = 20_000 if q else 100_000
        print(f"\n[3] tight loop of {n:,} agent.step(loss) calls, recording on")
        for per_step, label in ((True, "per-step messages (v1)"), (False, "columnar batches")):
            kept, per, loop = tight_loop(n, d, per_step)
            print(
                f"    {label:24s}: {kept:,} of {n:,} steps in the file, {per:.1f} bytes/step, "
                f"loop {loop / n * 1e6:.1f} µs/step  (targets: all, <= 42 B)"
            )
    n = 10_000 if q else 100_000
    print(f"\n[4] publisher with a subscriber reading everything, {n:,} steps")
    for per_step, label in ((True, "per-step messages (v1)"), (False, "columnar batches")):
        cpu, rate, seen = publish_cost(n, per_step)
        print(
            f"    {label:24s}: {cpu:.1f} µs publisher CPU/step, {rate:,.0f} steps/s end to end, "
            f"{seen:,} received  (target <= 10 µs)"
        )
    old = 10_000 if q else 100_000
    t, msgs, rows = snapshot_time(old, True)
    print(
        f"\n[5] snapshot, per-step messages (v1), {old:,}-step history kept whole: "
        f"{t * 1e3:.0f} ms for {msgs:,} messages ({rows:,} steps)"
    )
    big = 100_000 if q else 1_000_000
    t, msgs, rows = snapshot_time(big, False)
    print(
        f"    snapshot, columnar, {big:,}-step history: {t * 1e3:.0f} ms for {msgs:,} messages "
        f"({rows:,} steps)  (target <= 1 s)"
    )
    t, msgs, rows = snapshot_time(big, False, side_every=50)
    print(
        f"    snapshot, columnar, {big:,}-step history, a scalars message every 50 steps: "
        f"{t * 1e3:.0f} ms for {msgs:,} messages ({rows:,} steps + scalars)  (target <= 1 s)"
    )
    sharded.report(q)


if __name__ == "__main__":
    main()
