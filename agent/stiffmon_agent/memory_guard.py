r"""Keeping the curvature measurements out of the training's memory.

A curvature measurement holds vectors of all P trainable parameters: Lanczos (sharpness,
preconditioned sharpness) its basis and products, up to 3 n vectors for n products while its
storage doubles (:class:`~stiffmon_agent.metrics.rows.GrowingRows`), SLQ (density and trace)
its m-step basis, m vectors; both a few more for the Hessian-vector product and the Ritz
vectors. Before each one :class:`MemoryGuard` prices that,

    needed(n) = (per · n + extra) · P · bytes per number,

against the memory free on the parameters' device (``torch.cuda.mem_get_info`` plus what the
caching allocator holds unused; on the CPU ``MemAvailable`` of /proc/meminfo), and takes the
most products n whose need fits in :data:`SAFE_FRACTION` of it: the configured budget if it
fits, fewer (said once, an ``event`` ``memory-capped``) down to :data:`MIN_PRODUCTS`, else
none (the measurement is skipped with an ``event`` ``measurement-skipped``, reason ``memory``,
needed vs free). An out-of-memory error inside a measurement (torch's ``OutOfMemoryError``, a
``MemoryError``, a CPU allocator's "not enough memory") is caught by the runner, which frees
what the measurement held and halves that kind's product budget for the next time
(:meth:`MemoryGuard.lower`). What the HVP's own autograd graph holds (activations of the
probe) is not priced: the out-of-memory path covers it.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field

import torch
from torch import nn

from stiffmon_agent.metrics.state import trainable_parameters

__all__ = [
    "MIN_PRODUCTS",
    "SAFE_FRACTION",
    "MemoryGuard",
    "MemoryPlan",
    "MemorySkipped",
    "free_bytes",
    "human_bytes",
    "is_out_of_memory",
]

SAFE_FRACTION = 0.5
"""The share of the free memory a measurement may plan to use (the rest stays the training's)."""

MIN_PRODUCTS = {"sharpness": 6, "density": 4}
"""Fewest products worth measuring: a cold Lanczos start's block of 3 needs 6 to converge; an SLQ
run of 4 steps is a 4-node quadrature (exact for polynomials of degree ≤ 7)."""

PER_PRODUCT = {"sharpness": 3, "density": 1}
"""Vectors of length P held per product: the Lanczos basis and products (3 n at most while they
double); the SLQ basis (1 per step)."""


def extra_vectors(kind: str, k: int) -> int:
    """Vectors of length P a measurement holds besides those per product: the HVP (~4), for
    Lanczos the start block (3), the residuals, Ritz and warm-start vectors of the top k + 1
    (6 (k + 1): two solves' results alive at a cold check) and the preconditioner's (6); for
    SLQ the start, the product and its corrections (6)."""
    return 13 + 6 * (k + 1) if kind == "sharpness" else 10


def free_bytes(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``; None where unknown.

    CUDA: free device memory plus what PyTorch's caching allocator reserves but does not use.
    CPU: ``MemAvailable`` of /proc/meminfo (else psutil's ``available``, if installed).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed (CUDA, CPU allocator, Python)."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "not enough memory" in text
    )


def release(exc: BaseException) -> None:
    """Drop the tensors the failed measurement's frames still hold (the traceback keeps its
    frames and their locals alive) and give the freed CUDA blocks back to the device."""
    traceback.clear_frames(exc.__traceback__)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class MemorySkipped(Exception):
    """Not even :data:`MIN_PRODUCTS` products fit in the free memory."""

    def __init__(self, message: str, needed: int, free: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.free = free


@dataclass(frozen=True)
class MemoryPlan:
    """How many products a measurement may take.

    Attributes:
        products: Products per Lanczos solve (sharpness) or steps per SLQ run (density).
        needed: Bytes those products need (estimated).
        free: Bytes free on the device (None: unknown, not capped).
        capped: Fewer than configured (or than left after an out-of-memory error) because no
            more fit in the free memory.
    """

    products: int
    needed: int
    free: int | None
    capped: bool


@dataclass
class MemoryGuard:
    """The product budgets the memory allows each curvature measurement (see the module).

    Attributes:
        lowered: Each kind's budget after an out-of-memory error (halved at each).
        said: Kinds whose memory cap has been said.
        last: Each kind's products at its last plan (what an out-of-memory error halves).
    """

    lowered: dict[str, int] = field(default_factory=dict)
    said: set[str] = field(default_factory=set)
    last: dict[str, int] = field(default_factory=dict)

    def plan(
        self, kind: str, model: nn.Module, products: int, k: int = 1, dim: int | None = None
    ) -> MemoryPlan:
        """The products a ``kind`` measurement of ``model`` may take instead of ``products``
        (``dim``: the numbers in one of its vectors where that is not every trainable
        parameter: a sharpness restricted to the touched embedding rows).

        Raises:
            MemorySkipped: Not even :data:`MIN_PRODUCTS` fit in :data:`SAFE_FRACTION` of
                the free memory.
        """
        params = list(trainable_parameters(model).values())
        dim = dim or sum(p.numel() for p in params)
        want = min(products, self.lowered.get(kind, products))
        if not params:
            return MemoryPlan(want, 0, None, False)
        vector = dim * params[0].element_size()
        per, extra = PER_PRODUCT[kind], extra_vectors(kind, k)
        lowest = min(MIN_PRODUCTS[kind], want)
        free = free_bytes(params[0].device)
        if free is None:
            self.last[kind] = want
            return MemoryPlan(want, (per * want + extra) * vector, None, False)
        fit = math.floor((SAFE_FRACTION * free / vector - extra) / per)
        if fit < lowest:
            needed = (per * lowest + extra) * vector
            raise MemorySkipped(
                f"a {kind} measurement needs ~{human_bytes(needed)} for {lowest} products of "
                f"{dim:,} parameters and only {human_bytes(free)} is free (it uses at most "
                f"{SAFE_FRACTION:.0%} of it)",
                needed,
                free,
            )
        n = min(want, fit)
        self.last[kind] = n
        return MemoryPlan(n, (per * n + extra) * vector, free, n < want)

    def lower(self, kind: str, default: int) -> int:
        """Halve ``kind``'s budget after an out-of-memory error (not below
        :data:`MIN_PRODUCTS`); returns the new budget."""
        used = self.last.get(kind, self.lowered.get(kind, default))
        self.lowered[kind] = max(MIN_PRODUCTS[kind], used // 2)
        return self.lowered[kind]


def human_bytes(n: float) -> str:
    """``n`` bytes in GiB, MiB or KiB."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
