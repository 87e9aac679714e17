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

Only torch's default generators are seeded. A draw from ``numpy.random``, Python's ``random``,
or a ``torch.Generator`` of the script's own is not: with it every product sees another draw ξ_k
again, and in chunks the Lanczos basis mixes Hessians (λ1_H 2.52 and 2.65 at two steps of a
12-example DDPM drawing t and ε with numpy in chunks of 5, with a ``hessian-asymmetric`` warning
blaming a second derivative). :func:`unpinned` finds such a draw: two runs of one chunk, each
pinned alike, that differ. :data:`UNPINNED` says what that means and what to do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

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


UNPINNED = (
    "draws random numbers that the agent cannot seed: two passes of the first probe chunk differ "
    "with torch's CPU and CUDA generators seeded alike (numpy.random, Python's random, a "
    "torch.Generator of the script's own?), so each Hessian-vector product sees another draw "
    "and λ1_H, the trace and the density are not those of one objective (with the probe in "
    "several chunks the Lanczos basis mixes the draws' Hessians and λ1_H means nothing; in one "
    "chunk each measurement is of another draw). Draw with torch's default generator "
    "(torch.randn, torch.randint, torch.rand_like, no generator=) or put the draws in the probe "
    "(probe=((x0, t, eps), eps) with a forward that takes them)"
)
"""The end of the sentence said where :func:`unpinned` is true (after "the probe's forward or
loss")."""


def unpinned(run: Callable[[], object], devices: Sequence[int]) -> bool:
    """Whether ``run`` gives different tensors on two calls, each inside :func:`pinned` for
    chunk 0: a draw that seeding torch's default generators does not fix.

    Args:
        run: A pass of one probe chunk, returning a tensor or a (nested) sequence of them.
        devices: CUDA device indices to seed, e.g. from :func:`cuda_devices`.
    """
    with pinned(0, devices):
        first = _flat(run())
    with pinned(0, devices):
        second = _flat(run())
    return len(first) != len(second) or any(
        a.shape != b.shape or not torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
        for a, b in zip(first, second, strict=True)
    )


def _flat(out: object) -> list[Tensor]:
    return [t.detach() for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
