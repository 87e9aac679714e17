r"""Sharded measurement under torch.distributed: every rank measures its share of the probe.

Every rank passes the *same* global probe (the same code on every rank, as under DDP); rank r of
W takes the contiguous examples ``[⌊rN/W⌋, ⌊(r+1)N/W⌋)`` (:func:`bounds`), of the joint
train ∪ val probe for the Gram matrix and of the train probe for Hessian-vector products.

* **Gram matrix** (:func:`sharded_gram`): each rank computes its examples' per-layer gradients
  in the cheaper of two forms (dense per-example gradients, or the ghost factors of a linear /
  conv weight, :mod:`~stiffmon_agent.metrics.grad_blocks`); layer by layer these are
  all-gathered and rank r computes its rows G_l[I_r, :]; the rows are all-gathered into G_l and
  G = Σ_l G_l. Memory per rank: N × the largest layer's per-example size.
* **Hessian-vector products** (:class:`HvpLeader`, :func:`serve_hvps`): rank 0 runs the solver
  (Lanczos, SLQ, Hutchinson) unchanged and alone decides when to stop; each product broadcasts
  v, every rank computes (n_r/N) H_r v on its shard and the sum is reduced to rank 0:
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

import torch
import torch.distributed as dist
from torch import Tensor, nn

from stiffmon_agent.metrics import capture_activations, measurement_mode
from stiffmon_agent.metrics.grad_blocks import LayerGrads, per_example_grad_blocks
from stiffmon_agent.metrics.gram import GramResult
from stiffmon_agent.metrics.probe import (
    Batch,
    ForwardFn,
    LossFn,
    default_forward,
    per_example_losses,
    take,
    unreduced,
)
from stiffmon_agent.metrics.sharpness import HessianOperator
from stiffmon_agent.metrics.state import trainable_parameters
from stiffmon_agent.probe_set import MeasurementSkipped, ProbeSet

log = logging.getLogger("stiffmon_agent")

MatVec = Callable[[Tensor], Tensor]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel``; else ``model``."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    return model


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

    def broadcast_int(self, value: int, device: torch.device | None = None) -> int:
        """Rank 0's ``value`` on every rank."""
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.broadcast(t, 0)
        return int(t.item())


def current_shard(distributed: bool) -> Shard | None:
    """A :class:`Shard` when ``distributed`` and torch.distributed runs more than one process."""
    if not distributed or not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    return Shard(dist.get_rank(), world) if world > 1 else None


def agree(error: BaseException | None, what: str, device: torch.device | None = None) -> None:
    """Raise on every rank if ``what`` failed on any (this rank's own error where it failed)."""
    t = torch.tensor([1.0 if error is not None else 0.0], device=device)
    dist.all_reduce(t)
    if error is not None:
        raise error
    if float(t.item()) > 0:
        raise RuntimeError(f"{what} failed on {int(t.item())} other rank(s) (see their log)")


def check_same_probe(model: nn.Module, probe: ProbeSet, device: torch.device | None) -> None:
    """Check that every rank holds the same model size and the same global probe.

    Raises:
        ValueError: On every rank, if the sizes or a checksum of the probe differ.
    """
    n_params = sum(q.numel() for q in trainable_parameters(model).values())
    leaves = [t for t in _leaves((probe.inputs, probe.targets))]
    checksum = sum(float(t.double().sum()) + float(t.double().abs().sum()) for t in leaves)
    v = torch.tensor([probe.n, probe.n_train, n_params, checksum], dtype=torch.float64)
    v = v.to(device)
    hi, lo = v.clone(), v.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    if not torch.allclose(hi, lo, rtol=1e-9, atol=0.0):
        raise ValueError(
            "Agent(distributed=True) needs the same model and the same global probe on every "
            f"rank (rank sizes/checksums range from {lo.tolist()} to {hi.tolist()}); each rank "
            "measures its share of it"
        )
    if probe.n_train < dist.get_world_size():
        raise ValueError(
            f"Agent(distributed=True): the train probe ({probe.n_train} examples) needs at least "
            f"one example per rank ({dist.get_world_size()} ranks)"
        )


def _leaves(batch: Batch) -> list[Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(batch)[0] if isinstance(t, Tensor)]


def sharded_check_finite(
    model: nn.Module, loss_fn: LossFn, probe: ProbeSet, shard: Shard, forward: ForwardFn | None
) -> None:
    """:func:`~stiffmon_agent.probe_set.check_finite` over the shards, agreed on every rank.

    Raises:
        MeasurementSkipped: On every rank, if a weight or a train-probe loss is not finite.
        Exception: On every rank, if the probe forward failed on one.
    """
    device = _device(model)
    a, b = shard.bounds(probe.n_train)
    bad_params, bad, error = 0.0, 0.0, None
    try:
        for q in trainable_parameters(model).values():
            if not bool(torch.isfinite(q).all()):
                bad_params += 1
        x, y = take(probe.inputs, slice(a, b)), take(probe.targets, slice(a, b))
        with measurement_mode(model), torch.no_grad():
            out = (forward or default_forward)(model, x)
            losses = per_example_losses(unreduced(loss_fn), out, y, b - a)
        bad = float((~torch.isfinite(losses)).sum())
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


def _device(model: nn.Module) -> torch.device | None:
    q = next(iter(model.parameters()), None)
    if q is None or not dist.is_initialized():
        return None
    return q.device if dist.get_backend() == "nccl" else torch.device("cpu")


def _gather_rows(t: Tensor, counts: Sequence[int]) -> Tensor:
    """All-gather the rows (dim 0) of every rank's ``t``: (Σ counts, …), in rank order."""
    top = max(counts)
    buf = t.new_zeros((top, *t.shape[1:]))
    buf[: t.shape[0]] = t
    parts = [torch.empty_like(buf) for _ in counts]
    dist.all_gather(parts, buf.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


def _same_everywhere(values: list[int], device: torch.device | None) -> bool:
    """Whether every rank passed the same list of integers."""
    n = torch.tensor([len(values), -len(values)], dtype=torch.float64, device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    if n[0] != -n[1]:
        return False
    v = torch.tensor(values, dtype=torch.float64, device=device)
    both = torch.cat([v, -v])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return bool(torch.equal(both[: len(values)], -both[len(values) :]))


def _layout(blocks: dict[str, LayerGrads]) -> list[int]:
    out: list[int] = []
    for grads in blocks.values():
        for shape in grads.shapes():
            out += [-1, *shape]
        out.append(-2)
    return out


def sharded_gram(
    model: nn.Module,
    loss_fn: LossFn,
    probe: ProbeSet,
    shard: Shard,
    *,
    forward: ForwardFn | None = None,
    chunk_size: int | None = 128,
) -> GramResult:
    """The probe's Gram matrix G and its per-layer blocks, computed by rows on every rank.

    Returns:
        The whole G (N × N) on every rank, as :func:`~stiffmon_agent.metrics.per_example_gram`
        gives it in one process (up to rounding).
    """
    device = _device(model)
    counts = shard.counts(probe.n)
    a, b = shard.bounds(probe.n)
    x, y = take(probe.inputs, slice(a, b)), take(probe.targets, slice(a, b))
    blocks: dict[str, LayerGrads] = {}
    notes: tuple[str, ...] = ()
    error: BaseException | None = None
    for exact in (False, True):  # every rank dense and exact if the forms differ between ranks
        try:
            blocks, notes = per_example_grad_blocks(
                model,
                x,
                y,
                loss_fn,
                forward=forward,
                chunk_size=chunk_size,
                n_global=probe.n,
                exact=exact,
            )
        except Exception as exc:
            error = exc
        agree(error, "the per-example gradients", device)
        if _same_everywhere(_layout(blocks), device):
            break
        notes = (*notes, "the ranks chose different gradient forms: exact dense gradients")
    rows: list[Tensor] = []
    for local in blocks.values():  # the same keys, forms and shapes on every rank
        parts = [
            _gather_rows(t.to(device) if device is not None else t, counts) for t in local.tensors()
        ]
        try:
            if error is None:
                whole = LayerGrads.from_tensors([p.to(local.dense) for p in parts])
                rows.append(local.cross(whole))
        except Exception as exc:
            error = exc
        del parts
    agree(error, "the Gram rows", device)
    stacked = torch.stack(rows, dim=1)  # (n_r, K, N)
    gathered = _gather_rows(stacked.to(device) if device is not None else stacked, counts)
    gathered = gathered.to(stacked)
    layers = {k: gathered[:, i] for i, k in enumerate(blocks)}
    total = gathered.sum(dim=1)
    return GramResult(total, layers, dict.fromkeys(layers, "sharded"), notes)


def sharded_activations(
    model: nn.Module,
    probe: ProbeSet,
    layers: Sequence[str],
    shard: Shard,
    forward: ForwardFn | None = None,
) -> dict[str, Tensor]:
    """Activations of ``layers`` on the whole train probe (float64, flattened), each rank
    computing its shard's."""
    device = _device(model)
    counts = shard.counts(probe.n_train)
    a, b = shard.bounds(probe.n_train)
    acts: dict[str, Tensor] = {}
    error: BaseException | None = None
    try:
        x = take(probe.inputs, slice(a, b))
        got = capture_activations(model, x, list(layers), forward=forward)
        missing = [k for k in layers if k not in got]
        if missing:
            raise ValueError(f"no activations captured for {missing}")
        acts = {k: got[k].detach().double().reshape(b - a, -1) for k in layers}
    except Exception as exc:
        error = exc
    widths = torch.tensor([acts[k].shape[1] if k in acts else 0 for k in layers], device=device)
    hi, lo = widths.clone(), widths.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    if error is None and not torch.equal(hi, lo):
        error = ValueError("activation sizes differ between ranks")
    agree(error, "the activations", device)
    out = {}
    for k in layers:
        t = acts[k].to(device) if device is not None else acts[k]
        out[k] = _gather_rows(t, counts).cpu()
    return out


class HvpLeader:
    """Rank 0's side of distributed Hessian-vector products.

    :meth:`wrap` turns rank 0's :class:`~stiffmon_agent.metrics.sharpness.HessianOperator` (on
    its shard of the train probe) into the whole probe's H v; :meth:`finish` (always, once per
    measurement) releases the other ranks' :func:`serve_hvps`.

    Args:
        model: The network (for the parameter count, dtype and device).
        shard: Rank 0's shard.
        n_train: Examples of the whole train probe.
    """

    def __init__(self, model: nn.Module, shard: Shard, n_train: int) -> None:
        params = list(trainable_parameters(model).values())
        self.dim = sum(q.numel() for q in params)
        self.like = params[0].detach()
        a, b = shard.bounds(n_train)
        self.weight = (b - a) / n_train
        self.device = _device(model)
        self.finished = False

    def _buffer(self, cmd: float, scale: float, v: Tensor | None) -> Tensor:
        buf = torch.zeros(self.dim + 2, dtype=self.like.dtype, device=self.device)
        buf[0], buf[1] = cmd, scale
        if v is not None:
            buf[2:] = v.to(buf)
        return buf

    def wrap(self, op: HessianOperator) -> MatVec:
        """v ↦ Σ_r (n_r/N) H_r v, computed with every rank."""

        def matvec(v: Tensor) -> Tensor:
            dist.broadcast(self._buffer(1.0, op.scale, v), 0)
            error: BaseException | None = None
            try:
                own = self.weight * op(v)
            except Exception as exc:
                error, own = exc, torch.zeros(self.dim, dtype=self.like.dtype)
            red = torch.zeros(self.dim + 1, dtype=self.like.dtype, device=self.device)
            red[:-1] = own.to(red)
            red[-1] = 1.0 if error is not None else 0.0
            dist.reduce(red, 0)
            if error is not None:
                raise error
            if float(red[-1]) > 0:
                raise RuntimeError(
                    f"a Hessian-vector product failed on {int(red[-1])} other rank(s) "
                    "(see their log)"
                )
            return red[:-1].to(self.like.device)

        return matvec

    def finish(self) -> None:
        """Tell the other ranks that the measurement is over."""
        if not self.finished:
            self.finished = True
            dist.broadcast(self._buffer(0.0, 0.0, None), 0)


def serve_hvps(
    model: nn.Module,
    loss_fn: LossFn,
    probe: ProbeSet,
    shard: Shard,
    *,
    forward: ForwardFn | None = None,
    chunk_size: int | None = None,
) -> BaseException | None:
    """A non-zero rank's side: compute (n_r/N) · scale · H_r v for every v rank 0 sends.

    Returns when rank 0 calls :meth:`HvpLeader.finish`; an error here is sent to rank 0 with
    each product (whose measurement then fails) and returned, never raised.
    """
    params = list(trainable_parameters(model).values())
    dim = sum(q.numel() for q in params)
    like = params[0].detach()
    device = _device(model)
    a, b = shard.bounds(probe.n_train)
    weight = (b - a) / probe.n_train
    op: HessianOperator | None = None
    error: BaseException | None = None
    buf = torch.zeros(dim + 2, dtype=like.dtype, device=device)
    with measurement_mode(model):
        while True:
            dist.broadcast(buf, 0)
            if float(buf[0]) == 0.0:
                return error
            h = torch.zeros(dim, dtype=like.dtype, device=like.device)
            if error is None:
                try:
                    if op is None:
                        x, y = take(probe.inputs, slice(a, b)), take(probe.targets, slice(a, b))
                        op = HessianOperator(
                            model, x, y, loss_fn, forward=forward, chunk_size=chunk_size
                        )
                    h = (weight * float(buf[1])) * op(buf[2:].to(like.device))
                except Exception as exc:
                    error = exc
            red = torch.zeros(dim + 1, dtype=like.dtype, device=device)
            red[:-1] = h.to(red)
            red[-1] = 1.0 if error is not None else 0.0
            dist.reduce(red, 0)
