"""One demo training run on the bundled digits with an agent attached.

``python -m stiffmon_agent.demo.train --lr 0.05 --steps 1500 --record runs/lr0.05.stiff``

This is what ``stiffmon demo`` starts once per learning rate (and what ``demos/
digits_lr_sweep.py`` shows how to write): plain SGD, the same seed, data split and probe for every
learning rate, so the runs differ only in η.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import torch
from torch import nn

from stiffmon_agent import Agent
from stiffmon_agent.demo.data import load_digits_split
from stiffmon_agent.demo.models import digits_cnn, digits_mlp


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m stiffmon_agent.demo.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--lr", type=float, default=0.05, help="learning rate η")
    ap.add_argument("--momentum", type=float, default=0.0, help="heavy-ball momentum β")
    ap.add_argument("--steps", type=int, default=1500, help="training steps")
    ap.add_argument(
        "--batch-size", type=int, default=64, help="batch size (0: full batch, i.e. GD)"
    )
    ap.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    ap.add_argument(
        "--label-noise", type=float, default=0.0, help="fraction of random train labels"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-class", type=int, default=10, help="probe examples per class")
    ap.add_argument("--every", type=int, default=20, help="steps between heavy measurements")
    ap.add_argument(
        "--overhead-cap",
        type=float,
        default=1.0,
        help="agent overhead cap (1: none, so the schedule is deterministic)",
    )
    ap.add_argument("--endpoint", default=None, help="tcp://host:port to publish on")
    ap.add_argument("--record", default=None, help=".stiff file to record to")
    ap.add_argument("--name", default=None, help="run name (default: 'sgd lr=…')")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (several runs share the CPU)"
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    data = load_digits_split(
        seed=args.seed,
        per_class=args.per_class,
        label_noise=args.label_noise,
        image=args.model == "cnn",
    )
    model = digits_cnn() if args.model == "cnn" else digits_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    n = len(data.y_train)
    batch = n if args.batch_size <= 0 else args.batch_size
    name = args.name or (
        f"{'gd' if batch == n else 'sgd'} lr={args.lr:g}"
        + (f" β={args.momentum:g}" if args.momentum else "")
        + (f" noise={args.label_noise:g}" if args.label_noise else "")
    )
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    agent = Agent(
        model,
        nn.CrossEntropyLoss(),
        opt,
        probe=data.probe_train,
        val_probe=data.probe_val,
        run=name,
        endpoint=args.endpoint,
        record=args.record,
        class_names=data.class_names,
        gram_every=f"first:5,every:{args.every}",
        sharpness_every=f"first:5,every:{args.every}",
        density_every=f"every:{10 * args.every}",
        overhead_cap=args.overhead_cap,
        batch_size=batch,
        distance_layers=("1",),
    )
    g = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.perf_counter()
    try:
        for _ in range(args.steps):
            if stop["flag"]:
                break
            idx = torch.randperm(n, generator=g)[:batch] if batch < n else torch.arange(n)
            out = model(data.x_train[idx])
            loss = nn.functional.cross_entropy(out, data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            agent.step(loss, out, data.y_train[idx])
    except KeyboardInterrupt:
        agent.close(reason="interrupted")
        return 130
    with torch.no_grad():
        model.eval()
        val_acc = (model(data.x_val).argmax(1) == data.y_val).float().mean().item()
    agent.event(
        "finished",
        f"{name}: validation accuracy {val_acc:.3f} after {agent.step_count} steps "
        f"({time.perf_counter() - t0:.0f} s)",
        val_accuracy=val_acc,
    )
    agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
