"""A tiny training run with an agent, for transport tests (run as a subprocess)."""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from stiffmon_agent import Agent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", default="")
    ap.add_argument("--record", default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--nan-at", type=int, default=-1)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--curve-keys", default=None)
    ap.add_argument("--no-close", action="store_true")
    ap.add_argument("--forever", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(120, 6), torch.randint(0, 3, (120,))
    agent = Agent(
        model,
        nn.CrossEntropyLoss(),
        opt,
        probe=(x[:15], y[:15]),
        val_probe=(x[15:24], y[15:24]),
        run="script",
        endpoint=args.endpoint or None,
        record=args.record,
        gram_every=args.every,
        sharpness_every=args.every,
        overhead_cap=1.0,
        batch_size=16,
        curve_keys=args.curve_keys,
    )
    print(f"ready {agent.endpoint} {agent.run_id}", flush=True)
    step = 0
    while args.forever or step < args.steps:
        i = torch.randint(0, 120, (16,))
        out = model(x[i])
        loss = nn.functional.cross_entropy(out, y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        agent.step(torch.tensor(math.nan) if step == args.nan_at else loss, out, y[i])
        step += 1
        if args.delay:
            time.sleep(args.delay)
    if not args.no_close:
        agent.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
