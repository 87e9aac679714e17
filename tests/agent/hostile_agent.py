"""A training run that reports its own pace, for the adversarial tests (run as a subprocess).

Prints ``ready <endpoint> <run_id>``, waits for the ``--go`` file if given, then one line per
window, ``w <monotonic end> <steps> <process cpu seconds>``, and ``done <steps> <dropped>``
after ``close()``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from stiffmon_agent import Agent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--record", required=True)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--window", type=float, default=0.5)
    ap.add_argument("--go", default=None, help="start training once this file exists")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(512, 32), torch.randint(0, 10, (512,))
    agent = Agent(
        model,
        nn.CrossEntropyLoss(),
        opt,
        probe=(x[:20], y[:20]),
        run="hostile",
        endpoint=args.endpoint,
        record=args.record,
        gram_every=200,
        sharpness_every=200,
        overhead_cap=1.0,
        batch_size=32,
        registry=False,
    )
    print(f"ready {agent.endpoint} {agent.run_id}", flush=True)
    while args.go and not Path(args.go).exists():
        time.sleep(0.01)
    step = 0
    end = time.monotonic() + args.seconds
    window_end = time.monotonic() + args.window
    window_steps, cpu0 = 0, time.process_time()
    while True:
        i = torch.randint(0, 512, (32,))
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        agent.step(loss)
        step += 1
        window_steps += 1
        now = time.monotonic()
        if now >= window_end:
            cpu = time.process_time()
            print(f"w {now:.4f} {window_steps} {cpu - cpu0:.5f}", flush=True)
            window_steps, cpu0, window_end = 0, cpu, now + args.window
            if now >= end:
                break
    agent.close()
    print(f"done {step} {agent.dropped}", flush=True)


if __name__ == "__main__":
    main()
