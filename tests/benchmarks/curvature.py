"""Trace / density / gradient-test costs for the metrics benchmark (part [4] of its report).

PyHessian's defaults are re-run here with the same Hessian-vector products, so the comparison
is of algorithms, not of HVP implementations: its ``trace(maxIter=100, tol=1e-3)`` (Rademacher
samples until the running mean changes by < 0.1 %, at most 100) and its
``density(iter=100, n_v=1)`` (one Lanczos run of 100 steps with full reorthogonalisation; ours
reorthogonalises twice per step, PyHessian once, so the non-HVP part of that line is up to twice
PyHessian's own). At P ~ 2·10⁵ the O(m² P) reorthogonalisation of a 100-step run costs as much
as the HVPs on a CPU: fewer, shorter runs are cheaper for the same display.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import Tensor, nn

from stiffmon_agent.measure import make_probe
from stiffmon_agent.measure_curvature import density_messages, gradient_test_scalars
from stiffmon_agent.metrics import HessianOperator, measurement_mode, per_example_gram
from stiffmon_agent.metrics.density import rademacher, spectral_density

CE = nn.CrossEntropyLoss()


def pyhessian_trace(op: HessianOperator, gen: torch.Generator) -> tuple[float, int]:
    """PyHessian's ``trace(maxIter=100, tol=1e-3)`` loop on our HVPs: (estimate, HVPs)."""
    samples: list[float] = []
    trace = 0.0
    for _ in range(100):
        z = rademacher(op.dim, op.like, gen)
        samples.append(float(z @ op(z)))
        mean = statistics.fmean(samples)
        if abs(mean - trace) / (abs(trace) + 1e-6) < 1e-3:
            break
        trace = mean
    return statistics.fmean(samples), len(samples)


def _timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def curvature_benchmark(
    model: nn.Module, x: Tensor, y: Tensor, train_x: Tensor, train_y: Tensor, batch: int = 64
) -> dict[str, Any]:
    """HVPs and seconds per trace / density measurement, ours and PyHessian's defaults.

    Args:
        model: The network (the reference CNN).
        x: Probe inputs.
        y: Probe targets.
        train_x: Training inputs, for the time of one SGD step (the overhead unit).
        train_y: Training targets.
        batch: Training batch size.
    """
    gen = torch.Generator().manual_seed(0)
    probe = make_probe((x, y), None, None, None, None)
    density_messages(model, CE, probe, 0, runs=1, steps=2, trace_samples=0, generator=gen)  # warm
    msgs, t_ours = _timed(lambda: density_messages(model, CE, probe, 0, generator=gen))
    attrs = msgs[0].fields["attrs"]
    with measurement_mode(model):
        op = HessianOperator(model, x, y, CE)
        (tr_ph, n_ph), t_ph_trace = _timed(lambda: pyhessian_trace(op, gen))
        dens_ph, t_ph_density = _timed(
            lambda: spectral_density(
                op, op.dim, runs=1, steps=100, like=op.like.detach(), generator=gen
            )
        )
        v = rademacher(op.dim, op.like, gen)
        op(v)
        t_hvp = statistics.median(_timed(lambda: op(v))[1] for _ in range(5))
    gram = per_example_gram(model, x, y, CE).total.double()
    _, t_tests = _timed(lambda: gradient_test_scalars(gram))
    tests = gradient_test_scalars(gram)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: time a step, change nothing
    steps = []
    for i in range(6):
        sl = slice((i * batch) % max(1, train_x.shape[0] - batch), None)
        xb, yb = train_x[sl][:batch], train_y[sl][:batch]
        t0 = time.perf_counter()
        opt.zero_grad()
        CE(model(xb), yb).backward()
        opt.step()
        steps.append(time.perf_counter() - t0)
    t_step = statistics.median(steps[1:])
    return {
        "probe_n": int(y.shape[0]),
        "dim": int(attrs["dim"]),
        "ours_hvps": int(attrs["hvps"]),
        "ours_s": t_ours,
        "ours_trace": float(attrs["trace"]),
        "ours_trace_stderr": float(attrs["trace_stderr"]),
        "ours_runs_steps": (int(attrs["runs"]), int(attrs["steps"])),
        "ph_trace_hvps": n_ph,
        "ph_trace_s": t_ph_trace,
        "ph_trace": tr_ph,
        "ph_density_hvps": dens_ph.matvecs,
        "ph_density_s": t_ph_density,
        "ph_density_ritz_max": float(dens_ph.nodes.max()),
        "ours_ritz_max": float(attrs["ritz_max"]),
        "hvp_s": t_hvp,
        "tests_s": t_tests,
        "norm_test": tests["noise/norm_test"],
        "step_s": t_step,
        "batch": batch,
    }


def report_curvature(r: dict[str, Any]) -> None:
    """Print part [4] of the metrics benchmark."""
    runs, steps = r["ours_runs_steps"]
    print(
        f"\n[4] Hessian trace and density, reference CNN ({r['dim']:,} params), "
        f"train probe N = {r['probe_n']}"
    )
    print(
        f"    ours (density + trace, SLQ {runs}×{steps} + {r['ours_hvps'] - runs * steps} "
        f"Hutchinson): {r['ours_hvps']} HVPs, {r['ours_s']:.2f} s"
    )
    print(
        f"        trace {r['ours_trace']:.2f} ± {r['ours_trace_stderr']:.2f} (stderr), "
        f"top Ritz value {r['ours_ritz_max']:.3f}"
    )
    print(
        f"    PyHessian trace (maxIter=100, tol=1e-3): {r['ph_trace_hvps']} HVPs, "
        f"{r['ph_trace_s']:.2f} s, trace {r['ph_trace']:.2f}"
    )
    print(
        f"    PyHessian density (iter=100, n_v=1): {r['ph_density_hvps']} HVPs, "
        f"{r['ph_density_s']:.2f} s, top Ritz value {r['ph_density_ritz_max']:.3f}"
    )
    both = r["ph_trace_hvps"] + r["ph_density_hvps"]
    print(f"    HVPs ours / PyHessian trace + density: {r['ours_hvps'] / both:.3f}")
    print(
        f"    one HVP {r['hvp_s'] * 1e3:.1f} ms; one SGD step (batch {r['batch']}) "
        f"{r['step_s'] * 1e3:.1f} ms"
    )
    every = r["ours_s"] / (0.05 * r["step_s"])
    print(f"    density+trace fits a 5 % overhead budget if run every ≥ {every:.0f} steps")
    print(
        f"    gradient tests from the Gram matrix: {r['tests_s'] * 1e3:.2f} ms "
        f"(no extra backward pass); norm test θ_max {r['norm_test']:.3f}"
    )
