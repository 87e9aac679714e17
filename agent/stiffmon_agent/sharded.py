r"""The sharded measurements themselves: the Gram matrix by rows, activations, and
Hessian-vector products summed over the ranks (see :mod:`~stiffmon_agent.distributed` for the
split of the probe, the agreement rules and what each rank computes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from stiffmon_agent.block_exchange import (
    Task,
    block_buffers,
    collect,
    flatten_blocks,
    post_exchange,
    receive_buffers,
    tasks,
)
from stiffmon_agent.distributed import (
    MatVec,
    Shard,
    _gather_rows,
    agree,
    collective_device,
    extremes,
)
from stiffmon_agent.metrics import capture_activations, measurement_mode
from stiffmon_agent.metrics.grad_blocks import LayerGrads, fell_back, per_example_grad_blocks
from stiffmon_agent.metrics.gram import GramResult
from stiffmon_agent.metrics.probe import ForwardFn, LossFn, take
from stiffmon_agent.metrics.sharpness import HessianOperator
from stiffmon_agent.metrics.state import trainable_parameters
from stiffmon_agent.probe_set import ProbeSet

__all__ = ["HvpLeader", "serve_hvps", "sharded_activations", "sharded_gram"]


def _same_everywhere(values: list[int], device: torch.device | None) -> bool:
    """Whether every rank passed the same list of integers."""
    hi, lo = extremes(torch.tensor([len(values)], dtype=torch.float64), device)
    if not torch.equal(hi, lo):
        return False
    hi, lo = extremes(torch.tensor(values, dtype=torch.float64), device)
    return bool(torch.equal(hi, lo))


def _layout(blocks: dict[str, LayerGrads]) -> list[int]:
    out: list[int] = []
    for grads in blocks.values():
        for shape in grads.shapes():
            out += [-1, *shape]
        out.append(-2)
    return out


GATHER_BYTES = 64 << 20  # bound on one exchange's rows per shard: layers go in groups


def _groups(layers: list[LayerGrads], rows: int) -> list[list[LayerGrads]]:
    """Consecutive layers whose rows of one shard fit in :data:`GATHER_BYTES` (one exchange each;
    a bigger layer alone)."""
    out: list[list[LayerGrads]] = []
    size = 0
    for layer in layers:
        n = sum(t[:1].numel() * t.element_size() for t in layer.tensors()) * rows
        if not out or size + n > GATHER_BYTES:
            out.append([])
            size = 0
        out[-1].append(layer)
        size += n
    return out


def sharded_gram(
    model: nn.Module,
    loss_fn: LossFn,
    probe: ProbeSet,
    shard: Shard,
    *,
    forward: ForwardFn | None = None,
    chunk_size: int | None = 128,
) -> GramResult | None:
    """The probe's Gram matrix G and its per-layer blocks, computed in blocks on every rank.

    Each rank computes its diagonal block and its half of each off-diagonal block
    (:mod:`~stiffmon_agent.block_exchange`); rank 0 assembles them.

    Returns:
        On rank 0, the whole G (N × N) as :func:`~stiffmon_agent.metrics.per_example_gram`
        gives it in one process (up to rounding); None on the other ranks.
    """
    device = collective_device(model)
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
        # a rank whose check failed redid its rows exactly: so does every rank (one decision
        # everywhere, no rank left with rows its check did not see, and rank 0 says why)
        redone = int(not exact and fell_back(notes))
        if _same_everywhere([*_layout(blocks), redone], device):
            break
        notes = (
            *notes,
            "the ranks chose different gradient forms or another rank's check failed: exact dense "
            "gradients on every rank",
        )
    rank = shard.rank
    plan = tasks(rank, counts)
    mine: list[list[Tensor]] = []  # per layer: its blocks, in the order of the plan
    # Every allocation a rank may fail at comes before the collective that waits for it, and
    # the failure is agreed there: nobody is left waiting on a rank that gave up.
    for group in _groups(list(blocks.values()), max(counts)):  # the same on every rank
        flat: list[Tensor] = []
        buffers: dict[int, list[Tensor]] = {}
        try:
            if error is None:  # else an earlier group failed: the agreement below raises
                flat = _on(device, [t for local in group for t in local.tensors()])
                buffers = receive_buffers(flat, counts, rank)
        except Exception as exc:
            error = exc
        agree(error, "the Gram blocks", device)
        pending = post_exchange(flat, buffers, counts, rank)
        diagonal: list[Tensor] = []  # computed while the rows travel
        try:
            diagonal = [local.gram() for local in group]
        except Exception as exc:
            error = exc
        received = pending.wait()
        try:
            if error is None:
                mine += _off_diagonal(group, diagonal, received, plan)
        except Exception as exc:
            error = exc
    moved, parts = torch.empty(0), {}
    try:
        if error is None:
            flat_blocks = flatten_blocks(mine)
            moved = flat_blocks.to(device) if device is not None else flat_blocks
            parts = block_buffers(moved, counts, rank)
    except Exception as exc:
        error = exc
    agree(error, "the Gram blocks", device)
    whole = collect(moved, parts, counts, rank)
    if whole is None:
        return None
    whole = whole.to(mine[0][0])
    layers = {k: whole[i] for i, k in enumerate(blocks)}
    return GramResult(whole.sum(dim=0), layers, dict.fromkeys(layers, "sharded"), notes)


def _on(device: torch.device | None, ts: list[Tensor]) -> list[Tensor]:
    """``ts`` contiguous and on the collectives' ``device`` (moved only where they are not)."""
    return [(t.to(device) if device is not None else t).contiguous() for t in ts]


def _off_diagonal(
    group: list[LayerGrads],
    diagonal: list[Tensor],
    received: dict[int, list[Tensor]],
    plan: list[Task],
) -> list[list[Tensor]]:
    """Per layer of ``group``: its diagonal block, then the blocks of ``plan[1:]`` against the
    rows ``received`` from the other ranks (their tensors in the order of ``group``'s)."""
    out = []
    at = 0
    for local, diag in zip(group, diagonal, strict=True):
        k = len(local.tensors())
        theirs = {
            j: LayerGrads.from_tensors([t.to(local.dense) for t in ts[at : at + k]])
            for j, ts in received.items()
        }
        at += k
        layer = [diag]
        for t in plan[1:]:
            rows = LayerGrads.from_tensors([x[t.lo : t.hi] for x in local.tensors()])
            layer.append(rows.cross(theirs[t.other]))
        out.append(layer)
    return out


def sharded_activations(
    model: nn.Module,
    probe: ProbeSet,
    layers: Sequence[str],
    shard: Shard,
    forward: ForwardFn | None = None,
) -> dict[str, Tensor]:
    """Activations of ``layers`` on the whole train probe (float64, flattened), each rank
    computing its shard's; on rank 0 (empty on the other ranks)."""
    device = collective_device(model)
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
        whole = _gather_rows(t, counts)
        if whole is not None:
            out[k] = whole.cpu()
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
        self.device = collective_device(model)
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
    device = collective_device(model)
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
