r"""Sharded measurement under torch.distributed: every rank measures its share of the probe.

Every rank passes the *same* global probe (the same code on every rank, as under DDP); rank r of
W takes the contiguous examples ``[⌊rN/W⌋, ⌊(r+1)N/W⌋)`` (:func:`bounds`), of the joint
train ∪ val probe for the Gram matrix and of the train probe for Hessian-vector products.

The measurements live in :mod:`~stiffmon_agent.sharded`.

* **Gram matrix** (:func:`~stiffmon_agent.sharded.sharded_gram`): each rank computes its
  examples' per-layer gradients in the cheaper of two forms (dense per-example gradients, or
  the ghost factors of a linear / conv weight, :mod:`~stiffmon_agent.metrics.grad_blocks`).
  Every rank computes its diagonal block while the rows the other ranks need travel point to
  point; each off-diagonal block is split between its two ranks, so every product is computed
  once and the work is even; rank 0 receives the blocks and assembles G_l and G = Σ_l G_l
  (:mod:`~stiffmon_agent.block_exchange`). Memory per rank: the other ranks' rows it needs ×
  the largest layer group's per-example size.
* **Hessian-vector products** (:class:`~stiffmon_agent.sharded.HvpLeader`,
  :func:`~stiffmon_agent.sharded.serve_hvps`): rank 0 runs the solver (Lanczos, SLQ,
  Hutchinson) unchanged and alone decides when to stop; each product broadcasts v, every rank
  computes (n_r/N) H_r v on its shard and the sum is reduced to rank 0:
  Σ_r (n_r/N) H_r v = H v, the Hessian of the mean over the whole probe.
* **Agreement**: every step that can fail on one rank is followed by :func:`agree` (an
  all-reduce of a failure flag) before the next collective, so a failing rank never leaves the
  others waiting; the measurement then fails on every rank together.

:func:`sharded_parameters` finds FSDP / DTensor parameters, which the agent cannot measure (it
needs every rank to hold the full weights); :func:`unwrap` takes a model out of DDP so that the
measurement's forward and backward passes never reach DDP's gradient all-reduce hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from stiffmon_agent.metrics.probe import (
    Batch,
    ForwardFn,
    LossFn,
    take,
)
from stiffmon_agent.metrics.state import trainable_parameters
from stiffmon_agent.probe_check import probe_losses
from stiffmon_agent.probe_set import MeasurementSkipped, ProbeSet

log = logging.getLogger("stiffmon_agent")

MatVec = Callable[[Tensor], Tensor]


def _wrappers(model: nn.Module) -> list[nn.Module]:
    """``model`` and each module inside it through ``DistributedDataParallel`` /
    ``DataParallel`` and ``torch.compile`` wrappers, outermost first."""
    out = [model]
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(
            getattr(model, "_orig_mod", None), nn.Module
        ):
            model = model._orig_mod
        else:
            return out
        out.append(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` and ``torch.compile``
    (whose compiled graph runs no forward hooks, which the per-example gradients need: the
    measurements run the original module, on the same parameters); else ``model``."""
    return _wrappers(model)[-1]


def replicas(model: nn.Module) -> int:
    """The world size for a model wrapped in ``DistributedDataParallel`` (whose gradients are
    averaged over that many ranks' batches), else 1."""
    for m in _wrappers(model):
        ddp = isinstance(m, nn.parallel.DistributedDataParallel)
        if ddp and dist.is_available() and dist.is_initialized():
            return int(dist.get_world_size(getattr(m, "process_group", None)))
    return 1


def sharded_parameters(model: nn.Module) -> str | None:
    """Why the model's parameters are sharded across ranks (FSDP, DTensor), or None."""
    for name, mod in model.named_modules():
        cls = type(mod)
        if cls.__name__.startswith("FullyShardedDataParallel") or cls.__name__.startswith("FSDP"):
            return f"module {name or '(root)'} is {cls.__name__}"
    for name, q in model.named_parameters():
        kind = type(q).__name__
        if kind in ("DTensor", "FlatParameter") or type(getattr(q, "data", None)).__name__ == (
            "DTensor"
        ):
            return f"parameter {name} is a {kind}"
        if getattr(q, "_is_flat_param", False):
            return f"parameter {name} is an FSDP flat parameter"
    return None


def check_measurable(
    model: nn.Module, has_probe: bool, shard: Shard | None, rank0_only: bool
) -> None:
    """Refuse, at construction, what would fail or hang later.

    Raises:
        ValueError: If the model's parameters are sharded (FSDP, DTensor) and a probe is given
            (every measurement needs the full weights), or if sharded measurement is asked with
            ``rank0_only=False``.
    """
    if shard is not None and not rank0_only:
        raise ValueError("Agent(distributed=True) publishes from rank 0 only: rank0_only=True")
    if has_probe and (why := sharded_parameters(model)) is not None:
        raise ValueError(
            f"stiffmon measures with the full weights on every rank, but {why}: FSDP / DTensor "
            "sharded parameters are not supported (pass probe=None for the per-step scalars only)"
        )


def bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous examples ``[start, stop)`` of rank ``rank`` among ``world`` (sizes differ ≤ 1)."""
    return n * rank // world, n * (rank + 1) // world


@dataclass(frozen=True)
class Shard:
    """This process's place in the sharded measurement.

    Attributes:
        rank: Rank in the default process group.
        world: World size W (> 1).
    """

    rank: int
    world: int

    @property
    def leader(self) -> bool:
        """Rank 0 runs the solvers, assembles the results and publishes."""
        return self.rank == 0

    def bounds(self, n: int) -> tuple[int, int]:
        return bounds(n, self.rank, self.world)

    def counts(self, n: int) -> list[int]:
        return [b - a for a, b in (bounds(n, r, self.world) for r in range(self.world))]


def current_shard(distributed: bool) -> Shard | None:
    """A :class:`Shard` when ``distributed`` and torch.distributed runs more than one process."""
    if not distributed or not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    return Shard(dist.get_rank(), world) if world > 1 else None


def extremes(v: Tensor, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """(max, min) over the ranks of every element of ``v`` (on the CPU), in one all-reduce."""
    both = torch.cat([v, -v]).to(device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return both[: v.numel()].cpu(), -both[v.numel() :].cpu()


def agree(error: BaseException | None, what: str, device: torch.device | None = None) -> None:
    """Raise on every rank if ``what`` failed on any (this rank's own error where it failed)."""
    t = torch.tensor([1.0 if error is not None else 0.0], device=device)
    dist.all_reduce(t)
    if error is not None:
        raise error
    if float(t.item()) > 0:
        raise RuntimeError(f"{what} failed on {int(t.item())} other rank(s) (see their log)")


T = TypeVar("T")


def agreed(fn: Callable[..., T], args: Sequence[Any], shard: Shard | None, model: nn.Module) -> T:
    """``fn(*args)``; sharded, an error on any rank raises on every rank (nobody is left in the
    next collective)."""
    if shard is None:
        return fn(*args)
    result, error = None, None
    try:
        result = fn(*args)
    except Exception as exc:
        error = exc
    agree(error, getattr(fn, "__name__", "a step"), collective_device(model))
    return result  # type: ignore[return-value]


def check_same_setup(
    model: nn.Module, probe: ProbeSet | None, schedules: Sequence[Any] = ()
) -> None:
    """Check that every rank holds the same model size, global probe and schedules.

    Raises:
        ValueError: On every rank, if they differ between ranks, or if the train probe has fewer
            examples than there are ranks.
    """
    n_params = sum(q.numel() for q in trainable_parameters(model).values())
    checksum, n, n_train = 0.0, 0, 0
    if probe is not None:
        for t in _leaves((probe.inputs, probe.targets)):
            checksum += _checksum(t)
        n, n_train = probe.n, probe.n_train
    due = [
        sum(k for k in range(1, 1001) if schedule.due(k - 1)) for schedule in schedules
    ]  # which of the first 1000 steps each schedule measures
    v = torch.tensor([n, n_train, n_params, checksum, *due], dtype=torch.float64)
    hi, lo = extremes(v, collective_device(model))
    if not torch.allclose(hi, lo, rtol=1e-9, atol=0.0):
        raise ValueError(
            "Agent(distributed=True) needs the same model, the same global probe (the same "
            "examples in the same order) and the same schedules on every rank (probe size, "
            "train size, parameters, probe checksum, "
            f"schedules range from {lo.tolist()} to {hi.tolist()}); each rank measures its "
            "share of the probe"
        )
    if probe is not None and probe.n_train < dist.get_world_size():
        raise ValueError(
            f"Agent(distributed=True): the train probe ({probe.n_train} examples) needs at least "
            f"one example per rank ({dist.get_world_size()} ranks)"
        )


def _checksum(t: Tensor) -> float:
    r"""A checksum of ``t`` that tells the order of its examples (dim 0) and elements apart.

    With x the values as (n, k) rows, it is Σ x + Σ |x| + Σ_i Σ_j (1 + i/n)(1 + j/k) x_ij: rank r
    measures the examples ``[⌊rN/W⌋, ⌊(r+1)N/W⌋)`` of its own probe, so the same examples in
    another order on another rank (shuffled with a rank-dependent seed) would overlap and miss
    shards, silently; plain sums cannot see the order.
    """
    d = t.detach().double()
    total = float(d.sum()) + float(d.abs().sum())
    if d.ndim == 0 or d.numel() == 0:
        return total
    rows = d.reshape(d.shape[0], -1)
    n, k = rows.shape
    wi = 1 + torch.arange(n, dtype=torch.float64, device=d.device) / n
    wj = 1 + torch.arange(k, dtype=torch.float64, device=d.device) / k
    return total + float(wi @ rows @ wj)


def _leaves(batch: Batch) -> list[Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(batch)[0] if isinstance(t, Tensor)]


def sharded_check_finite(
    model: nn.Module,
    loss_fn: LossFn,
    probe: ProbeSet,
    shard: Shard,
    forward: ForwardFn | None,
    *,
    losses: bool = True,
) -> None:
    """:func:`~stiffmon_agent.probe_check.check_finite` over the shards, agreed on every rank
    (``losses`` may differ between ranks: the forward pass is local).

    Raises:
        MeasurementSkipped: On every rank, if a weight or a train-probe loss is not finite.
        Exception: On every rank, if the probe forward failed on one.
    """
    device = collective_device(model)
    a, b = shard.bounds(probe.n_train)
    bad_params, bad, error = 0.0, 0.0, None
    try:
        for q in trainable_parameters(model).values():
            if not bool(torch.isfinite(q).all()):
                bad_params += 1
        if losses:
            x, y = take(probe.inputs, slice(a, b)), take(probe.targets, slice(a, b))
            values = probe_losses(model, loss_fn, x, y, b - a, forward)
            bad = float((~torch.isfinite(values)).sum())
    except Exception as exc:
        error = exc
    t = torch.tensor([bad_params, bad, 1.0 if error else 0.0], device=device)
    dist.all_reduce(t)
    if error is not None:
        raise error
    if t[2] > 0:
        raise RuntimeError(f"the probe forward failed on {int(t[2])} other rank(s) (see their log)")
    if t[0] > 0:
        raise MeasurementSkipped("a parameter is not finite (the run has diverged)")
    if t[1] > 0:
        raise MeasurementSkipped(
            f"the probe loss is not finite for {int(t[1])} of {probe.n_train} examples"
        )


def collective_device(model: nn.Module) -> torch.device | None:
    """Where collective tensors live: the parameters' device under NCCL, else the CPU."""
    q = next(iter(model.parameters()), None)
    if q is None or not dist.is_initialized():
        return None
    return q.device if dist.get_backend() == "nccl" else torch.device("cpu")


def _gather_rows(t: Tensor, counts: Sequence[int]) -> Tensor | None:
    """The rows (dim 0) of every rank's ``t`` on rank 0: (Σ counts, …), in rank order; None on
    the other ranks (only rank 0 assembles and publishes)."""
    top = max(counts)
    buf = t.new_zeros((top, *t.shape[1:]))
    buf[: t.shape[0]] = t
    parts = [torch.empty_like(buf) for _ in counts] if dist.get_rank() == 0 else None
    dist.gather(buf.contiguous(), parts, dst=0)
    if parts is None:
        return None
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])
