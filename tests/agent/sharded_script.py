"""A training script for the sharded-measurement tests: run under torchrun, or alone (reference).

    torchrun --nproc_per_node 2 tests/agent/sharded_script.py OUT MODE [MODEL]

MODE: ``sharded`` (DDP-wrapped model, ``Agent(distributed=True)``), ``reference`` (one process,
the same global probe and the same training steps), ``fail`` (unwrapped model; at step 0 rank 1
alone sees a NaN probe loss, at step 1 its share of the Gram and of the Hessian-vector products
raises: rank 0 must skip, then report the errors, and nobody may hang), ``fail-rows`` (rank 1
cannot lay out its Gram rows for the exchange, as if out of memory: the Gram fails on every
rank, and nobody may wait for rows that never come), ``rank0-step`` (every rank makes the agent,
only rank 0 calls ``step()``: rank 0 must stop sharding after ``rank_timeout`` and measure alone),
``rank0-agent`` (only rank 0 makes the agent: it must raise, naming rank 1, after
``rank_timeout``), ``infonce`` (an in-batch contrastive probe loss, whose example-alone
gradients vanish: every rank must refuse the Gram with the reason, and the Hessian measurements
go on).
MODEL: ``cnn`` (default: conv, linear, layer norm, a raw parameter) or ``tokens`` (embedding,
linear layers over 3 positions). Float64 throughout; every rank trains on the same batch, so
DDP's averaged gradient equals the one-process gradient and the weights stay those of the
reference run.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn


class Scale(nn.Module):  # a raw parameter: the exact (vmap) path
    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


class Tokens(nn.Module):
    """A sequence model: an embedding, linear layers applied at every one of 3 positions (ghost
    factors with T > 1, or materialised), mean pooling, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.proj = nn.Linear(8, 32)
        self.mix = nn.Linear(32, 64)  # wide enough for its ghost factors to be the cheaper form
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.emb(x)))
        return self.head(torch.tanh(self.mix(h)).mean(dim=1))


def info_nce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example InfoNCE over the (shard's) batch: example i against the others' outputs."""
    z = nn.functional.normalize(z, dim=1)
    return nn.functional.cross_entropy(z @ z.T / 0.5, torch.arange(len(z)), reduction="none")


def build(kind: str = "cnn") -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    if kind == "tokens":
        return Tokens(), (torch.randint(0, 12, (40, 3)), torch.randint(0, 3, (40,)))
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
        nn.LayerNorm(10),
        Scale(),
        nn.Tanh(),
        nn.Linear(10, 3),
    )
    x = torch.randn(40, 1, 6, 6)
    y = torch.randint(0, 3, (40,))
    return model, (x, y)


def main() -> None:
    torch.set_default_dtype(torch.float64)
    out, mode = sys.argv[1], sys.argv[2]
    kind = sys.argv[3] if len(sys.argv) > 3 else "cnn"
    sharded = mode != "reference"
    if sharded:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if sharded else 0
    model, (x, y) = build(kind)
    net = nn.parallel.DistributedDataParallel(model) if mode == "sharded" else model
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    if mode == "sharded":
        import stiffmon_agent.sharded as sh

        sh.GATHER_BYTES = 4000  # layers gathered alone and in groups

    if mode == "fail-rows" and rank == 1:
        import stiffmon_agent.sharded as sh

        def no_memory(*args: object, **kwargs: object) -> object:
            raise RuntimeError("rank 1 is out of memory")

        sh._on = no_memory  # type: ignore[assignment]
    if mode == "fail" and rank == 1:
        import stiffmon_agent.probe_check as dd
        import stiffmon_agent.sharded as d

        def broken(*args: object, **kwargs: object) -> object:
            raise RuntimeError("rank 1 broke")

        d.per_example_grad_blocks = broken  # type: ignore[assignment]
        d.HessianOperator.__call__ = broken  # type: ignore[method-assign]
        calls = [0]
        losses = dd.per_example_losses

        def nan_first(*args: object, **kwargs: object) -> torch.Tensor:
            calls[0] += 1  # the three checks of step 0 see a NaN loss on rank 1 only
            out = losses(*args, **kwargs)  # type: ignore[arg-type]
            return out * float("nan") if calls[0] <= 3 else out

        dd.per_example_losses = nan_first  # type: ignore[assignment]
    lonely = mode in ("rank0-step", "rank0-agent")
    if mode == "rank0-agent" and rank != 0:
        print(f"rank {rank} done, no agent", flush=True)
        dist.barrier()
        dist.destroy_process_group()
        return
    try:
        loss_fn = info_nce if mode == "infonce" else nn.CrossEntropyLoss()
        agent = make_agent(net, opt, x, y, out, rank, sharded, kind, loss_fn)
    except RuntimeError as exc:
        print(f"rank {rank} done, refused: {exc}", flush=True)
        dist.barrier()
        dist.destroy_process_group()
        return
    for _ in range(4):
        loss = nn.functional.cross_entropy(net(x[20:36]), y[20:36])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 or not lonely:
            agent.step(loss)
    agent.close()
    print(f"rank {rank} done, disabled: {sorted(agent.disabled)}", flush=True)
    if sharded:
        dist.barrier()  # every rank done before the group goes
        dist.destroy_process_group()


def make_agent(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    out: str,
    rank: int,
    sharded: bool,
    kind: str,
    loss_fn: object,
) -> object:
    from stiffmon_agent import Agent

    return Agent(
        net,
        loss_fn,
        opt,
        probe=(x[:13], y[:13]),  # 13 train + 7 val: uneven shards
        val_probe=(x[13:20], y[13:20]),
        endpoint="",
        record=out if rank == 0 else None,
        registry=False,
        distributed=sharded,
        gram_every="first:3,every:100",
        sharpness_every="first:3,every:100",
        density_every="first:3,every:100",
        overhead_cap=None,
        distance_layers=["3" if kind == "cnn" else "mix"],
        hessian_k=2,
        density_runs=1,
        density_steps=6,
        trace_samples=2,
        chunk_size=4,
        batch_size=16,
        rank_timeout=4.0,
    )


if __name__ == "__main__":
    main()
