"""Lanczos holds memory for the products it takes, not for its whole budget.

The basis and the products of :func:`~stiffmon_agent.metrics.eigen.lanczos` used to be two
dense (P × ``max_matvecs``) tensors allocated up front (400 · P bytes in float32 at the default
50): on a diagonal operator of P = 5·10⁶ that converges in 6 products that is 2 GB (measured:
+2.40 GB peak RSS) where the growing basis takes +0.48–0.56 GB. Measured in a fresh process
(peak RSS, ``ru_maxrss``) so the test's own allocations do not mask it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

from stiffmon_agent.metrics.eigen import lanczos

DIM = 5_000_000
BUDGET = 50

SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from stiffmon_agent.metrics.eigen import lanczos

    dim, budget = int(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    d = torch.ones(dim)
    d[:3] = torch.tensor([10.0, 5.0, 2.0])  # four distinct eigenvalues: an invariant Krylov space
    like = torch.zeros((), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    lanczos(lambda v: d[:1000] * v, 1000, like=like, generator=g)  # warm the code up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = lanczos(lambda v: d * v, dim, max_matvecs=budget, like=like, generator=g)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"growth": after - before, "matvecs": res.matvecs,
                      "converged": res.converged, "lam": float(res.eigenvalues[0])}))
    """
)


def test_peak_memory_follows_products_taken_not_the_budget() -> None:
    """Peak RSS growth ≤ 0.3 × the old preallocation 2 · 50 · P · 4 bytes (2 GB)."""
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(DIM), str(BUDGET)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    old = 2 * BUDGET * DIM * 4
    assert r["growth"] <= 0.3 * old, (r, old)
    # the old (P, budget) layout's strided float32 products also lost the basis' orthogonality
    # here: θ1 = 242 for λ_max = 10, not converged in 50 products
    assert r["converged"] and abs(r["lam"] - 10.0) < 1e-3, r
    assert r["matvecs"] <= 10, r


def test_growing_basis_gives_the_preallocated_numbers_in_float64() -> None:
    """Many products (the basis grows several times) still give the dense eigenvalues."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(120, 120, generator=g, dtype=torch.float64)
    a = a + a.T
    ref = torch.linalg.eigvalsh(a).flip(0)[:3]
    res = lanczos(lambda v: a @ v, 120, 3, tol=1e-10, max_matvecs=120, generator=g)
    assert res.converged
    rel = ((res.eigenvalues - ref).abs() / ref.abs()).max()
    assert float(rel) < 1e-9, (res.eigenvalues, ref)
