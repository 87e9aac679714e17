"""Agent benchmarks: ``python -m tests.benchmarks.agent [--quick]``.

Prints, measured side by side in one run:

1. ``agent.step()`` when nothing is due: median µs per call (target ≤ 20 µs).
2. Whole-run overhead at the default schedule on the demo CNN (digits, batch 64): wall time with
   the agent ÷ without (target ≤ 1.05). The agent publishes (nobody subscribed) and records.
3. Publish cost: messages per second through the publisher thread to a subscriber that reads
   everything, and µs per message.
4. Snapshot time for a 100k-step history, with the default scalar-history bound (10,000 kept)
   and with the bound raised to keep all 100k.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from stiffmon import protocol as p
from stiffmon.client import Client
from stiffmon_agent import Agent
from stiffmon_agent.demo.data import load_digits_split
from stiffmon_agent.demo.models import digits_cnn
from stiffmon_agent.publisher import Outgoing
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


def train(steps: int, with_agent: bool, record: Path | None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process) for one training run."""
    torch.manual_seed(0)
    data = load_digits_split(seed=0)
    model = digits_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    agent = None
    if with_agent:
        agent = Agent(
            model,
            nn.CrossEntropyLoss(),
            opt,
            probe=data.probe_train,
            val_probe=data.probe_val,
            endpoint=f"tcp://127.0.0.1:{free_port_pair()}",
            record=record,
            batch_size=64,
        )
    g = torch.Generator().manual_seed(1)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        i = torch.randint(0, len(data.y_train), (64,), generator=g)
        out = model(data.x_train[i])
        loss = nn.functional.cross_entropy(out, data.y_train[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if agent is not None:
            agent.step(loss, out, data.y_train[i])
    if agent is not None:
        agent.close()
    return time.perf_counter() - t0, time.process_time() - c0


def publish_rate(n: int) -> tuple[float, float]:
    ep = f"tcp://127.0.0.1:{free_port_pair()}"
    model = nn.Linear(2, 2)
    agent = Agent(model, nn.CrossEntropyLoss(), None, endpoint=ep, queue_size=n + 10)
    client = Client([ep])
    got = 0
    deadline = time.monotonic() + 5
    while got == 0 and time.monotonic() < deadline:
        got += len(client.poll(0.1))  # the hello: connected
    pub = agent.publisher
    assert pub is not None
    t0 = time.perf_counter()
    for i in range(n):
        pub.submit(
            Outgoing(
                p.Scalars, i, 0.0, {"values_names": ["loss", "lr/0"], "values_raw": [1.0, 0.1]}
            )
        )
    seen = 0
    while seen < n and time.perf_counter() - t0 < 60:
        seen += sum(1 for m, _ in client.poll(0.05) if m.kind == "scalars")
    elapsed = time.perf_counter() - t0
    client.close()
    agent.close()
    return seen / elapsed, elapsed / max(seen, 1) * 1e6


def snapshot_time(steps: int, keep: int) -> tuple[float, int]:
    ep = f"tcp://127.0.0.1:{free_port_pair()}"
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = Agent(
        model,
        nn.CrossEntropyLoss(),
        opt,
        endpoint=ep,
        queue_size=steps + 10,
        max_scalar_history=keep,
    )
    for _ in range(steps):
        agent.step(0.5)
    pub = agent.publisher
    assert pub is not None
    while pub.published < steps + 1:
        time.sleep(0.05)
    t0 = time.perf_counter()
    client = Client([ep], snapshot_timeout=60)
    n = 0
    while client.stats.snapshots == 0 and time.perf_counter() - t0 < 60:
        n += len(client.poll(0.05))
    elapsed = time.perf_counter() - t0
    client.close()
    agent.close()
    return elapsed, n


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.agent",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(
        f"stiffmon agent benchmark — torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    us = step_cost(2_000 if args.quick else 20_000)
    print(f"\n[1] agent.step() with nothing due: median {us:.2f} µs  (target <= 20)")
    steps = 300 if args.quick else 2000
    with tempfile.TemporaryDirectory() as d:
        base_runs, agent_runs = [], []
        for i in range(5):  # interleaved, best of five each: the machine is noisy
            base_runs.append(train(steps, False, None))
            agent_runs.append(train(steps, True, Path(d) / f"r{i}.stiff"))
        base, with_agent = min(r[0] for r in base_runs), min(r[0] for r in agent_runs)
        base_cpu, agent_cpu = min(r[1] for r in base_runs), min(r[1] for r in agent_runs)
    print(f"\n[2] whole run, demo CNN on digits, {steps} steps of batch 64, default schedule")
    print(
        f"    without agent {base:.2f} s, with agent {with_agent:.2f} s: "
        f"ratio {with_agent / base:.3f}  (target <= 1.05)"
    )
    print(
        f"    CPU time of the process: {base_cpu:.2f} s vs {agent_cpu:.2f} s: "
        f"ratio {agent_cpu / base_cpu:.3f}"
    )
    rate, per = publish_rate(5_000 if args.quick else 50_000)
    print(f"\n[3] publish: {rate:,.0f} messages/s end to end ({per:.1f} µs per message)")
    n_steps = 10_000 if args.quick else 100_000
    for keep in (10_000, n_steps):
        t, n = snapshot_time(n_steps, keep)
        print(
            f"\n[4] snapshot of a {n_steps:,}-step history, scalar bound {keep:,}: "
            f"{t * 1e3:.0f} ms for {n:,} messages"
        )


if __name__ == "__main__":
    main()
