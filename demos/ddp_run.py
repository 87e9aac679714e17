"""The agent under torch.distributed: 2 processes on the gloo backend (CPU).

    torchrun --nproc_per_node 2 demos/ddp_run.py --steps 300       # then: stiffmon watch

Every rank builds the same agent with the same global probe and ``distributed=True``: each rank
measures its share of the probe (its blocks of the Gram matrix, its part of every Hessian-vector
product), rank 0 assembles the results and alone publishes. ``--rank0-only`` measures on rank 0
alone instead (the other ranks' agents are no-ops and wait in their next all-reduce). Without
torchrun the script starts its two processes itself (``--spawn``).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
from torch import nn

from stiffmon_agent import Agent
from stiffmon_agent.demo.data import load_digits_split
from stiffmon_agent.demo.models import digits_mlp


def train(rank: int, world: int, args: argparse.Namespace, init: str = "env://") -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    data = load_digits_split(image=False)
    model = nn.parallel.DistributedDataParallel(digits_mlp())
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    shard = torch.arange(rank, len(data.y_train), world)  # each rank its share of the data
    agent = Agent(
        model,
        nn.CrossEntropyLoss(),
        opt,
        probe=data.probe_train,
        val_probe=data.probe_val,
        run=f"ddp x{world} lr={args.lr:g}",
        endpoint=args.endpoint,
        record=args.record,
        class_names=data.class_names,
        batch_size=args.batch_size * world,
        distributed=not args.rank0_only,
        overhead_cap=args.overhead_cap,
    )
    g = torch.Generator().manual_seed(rank)
    for _ in range(args.steps):
        i = shard[torch.randint(0, len(shard), (args.batch_size,), generator=g)]
        out = model(data.x_train[i])
        loss = nn.functional.cross_entropy(out, data.y_train[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        agent.step(loss, out, data.y_train[i])
    agent.close()
    if rank == 0:
        print(f"done: {args.steps} steps on {world} ranks")
    dist.barrier()  # every rank done before the group goes (gloo aborts on a one-sided teardown)
    dist.destroy_process_group()


def _spawned(rank: int, world: int, args: argparse.Namespace, init: str) -> None:
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
    train(rank, world, args, init)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=32, help="per rank")
    ap.add_argument("--endpoint", default=None)
    ap.add_argument("--record", default=None)
    ap.add_argument("--rank0-only", action="store_true", help="measure on rank 0 alone")
    ap.add_argument(
        "--overhead-cap",
        type=float,
        default=1.0,
        help="agent overhead cap (default 1: none, a demo to watch; training keeps 0.02)",
    )
    ap.add_argument("--spawn", type=int, default=0, help="start N processes without torchrun")
    args = ap.parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        train(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return
    world = args.spawn or 2
    # rendezvous through a file, not a port picked here and released: another process could
    # take that port before the group binds it
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        torch.multiprocessing.spawn(_spawned, args=(world, args, init), nprocs=world)


if __name__ == "__main__":
    main()
