r"""One draw of a random probe objective for every Hessian-vector product of a measurement.

A forward or loss that draws random numbers in eval mode (a diffusion model's timestep t and
noise ε sampled in ``forward=``, a VAE's reparameterisation z = μ + σ ε, ``F.dropout(x, p,
training=True)``) makes the probe objective a random function L(θ; ξ). A Lanczos run needs one
symmetric matrix: where every product H v ran the forward anew (probes in several chunks, or a
backend that rebuilds the graph per product), each product saw another Hessian H(ξ_k), the Krylov
basis mixed them, and λ1_H came out wrong (on a 12-example DDPM in chunks of 5: 3.31 published
with vᵀHw − wᵀHv 38 % of their size, against 3.10 for a fixed draw), with the symmetry warning
blaming a wrong second derivative.

:func:`pinned` runs the c-th chunk's forward and loss with the CPU and CUDA generators seeded to
``PIN_SEED + c``, inside a fork of the generators (the caller's random state is left as it was,
and the start vectors of the solver, drawn outside, stay random). Every product, every backend
and every measurement then sees the same draw ξ_c per chunk: the operator is the Hessian of the
fixed objective (1/N) Σ_c n_c L_c(θ; ξ_c), symmetric, and λ1_H, the trace and the density are
those of one objective that the steps compare (common random numbers). A forward without
randomness is unaffected.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

PIN_SEED = 0x5EED
"""Seed of chunk 0's draws; chunk c uses ``PIN_SEED + c``."""


def cuda_devices(params: Sequence[Tensor]) -> list[int]:
    """The CUDA device indices the parameters live on (whose generators a draw may use)."""
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})


@contextmanager
def pinned(chunk: int, devices: Sequence[int]) -> Iterator[None]:
    """Run the body with the CPU and the ``devices``' CUDA generators seeded to
    ``PIN_SEED + chunk``, restoring their states afterwards.

    Args:
        chunk: Index of the probe chunk whose forward runs inside.
        devices: CUDA device indices to seed (and restore), e.g. from :func:`cuda_devices`.
    """
    seed = PIN_SEED + chunk
    with torch.random.fork_rng(devices=list(devices)):
        torch.default_generator.manual_seed(seed)
        for d in devices:
            torch.cuda.default_generators[d].manual_seed(seed)
        yield
