"""Curvature and batch-size messages: Hessian trace and density, Cockpit's gradient tests.

Message names (the monitor relies on them):

* with every Gram measurement (:func:`noise_messages`), in its ``scalars``:
  ``noise/{trace_k,lambda1_k,trace_sigma,grad_sq,b_simple,conditioning}``, ``noise/norm_test``,
  ``noise/inner_product_test``, ``noise/orthogonality_test`` (θ_max, θ_max, ν_max on the train
  probe), ``noise/suggested_batch/<test>`` (the batch size each test asks for at the chosen θ)
  and ``noise/theta/<test>`` (that θ); ``spectrum`` ``grad-cov``; an ``event`` ``noise-off``
  for a train probe of one example, ``noise-unresolved`` where Tr K is within rounding of 0;
* on the density schedule: ``curve`` ``hessian-density`` (x: eigenvalue grid, y: density),
  ``attrs`` ``sigma`` (Gaussian broadening, standard deviation), ``grid`` (``"linear"``),
  ``runs``, ``steps``, ``hvps``, ``dim``, ``ritz_min``, ``ritz_max``, ``trace``,
  ``trace_stderr``, ``zero_mass``, ``solved_dim``; and ``scalars``
  ``curvature/{trace,trace_stderr,hvps}``.

The Hessian is that of the mean loss on the train probe, the one whose λ1_H the sharpness
measurement tracks (same operator, :class:`~stiffmon_agent.metrics.sharpness.HessianOperator`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from stiffmon import protocol as p
from stiffmon_agent.metrics import (
    HessianOperator,
    gradient_noise,
    gradient_tests,
    measurement_mode,
)
from stiffmon_agent.metrics.density import spectral_density, with_zero_block
from stiffmon_agent.metrics.eigen import MatVec
from stiffmon_agent.metrics.gradient_tests import (
    DEFAULT_NU_ORTHO,
    DEFAULT_THETA_INNER,
    DEFAULT_THETA_NORM,
)
from stiffmon_agent.metrics.probe import Batch, ForwardFn, LossFn
from stiffmon_agent.metrics.restricted_curvature import touched_operator
from stiffmon_agent.outgoing import Outgoing

if TYPE_CHECKING:  # measure imports this module for the gradient tests
    from stiffmon_agent.measure import ProbeSet

TESTS = ("norm_test", "inner_product_test", "orthogonality_test")


def noise_messages(
    train_gram: Tensor,
    step: int,
    t: float,
    noise_k: int,
    batch_test_theta: tuple[float, float, float],
    eps: float,
) -> tuple[dict[str, float], list[Outgoing]]:
    """The gradient-noise scalars, the batch-size tests and the ``grad-cov`` spectrum from the
    train probe's Gram (float64), computed in a dtype of unit roundoff ``eps``; with fewer than
    two train examples none (no sample variance), and an event that says so."""
    nt = train_gram.shape[0]
    if nt < 2:
        message = (
            "no gradient noise or batch-size tests: they need a sample variance over at least 2 "
            f"train-probe examples, the probe has {nt}"
        )
        fields = {"level": "info", "code": "noise-off", "message": message, "attrs": {}}
        return {}, [Outgoing(p.Event, step, t, fields)]
    out: list[Outgoing] = []
    noise = gradient_noise(train_gram, k=noise_k, eps=eps)
    if noise.unresolved is not None:
        fields = {"level": "warning", "code": "noise-unresolved", "message": noise.unresolved}
        out.append(Outgoing(p.Event, step, t, fields | {"attrs": {}}))
    scalars = {
        "noise/trace_k": noise.trace_k,
        "noise/lambda1_k": noise.lambda1,
        "noise/trace_sigma": noise.trace_sigma,
        "noise/grad_sq": noise.grad_sq_unbiased,
        "noise/b_simple": noise.b_simple,
        "noise/conditioning": float(noise.conditioning[-1])
        if noise.conditioning.numel()
        else math.nan,
    }
    theta_norm, theta_inner, nu_ortho = batch_test_theta
    scalars.update(
        gradient_test_scalars(
            train_gram, theta_norm=theta_norm, theta_inner=theta_inner, nu_ortho=nu_ortho, eps=eps
        )
    )
    fields = {"name": "grad-cov", "values": noise.eigenvalues.numpy(), "attrs": {"n": nt}}
    out.append(Outgoing(p.Spectrum, step, t, fields))
    return scalars, out


def gradient_test_scalars(
    train_gram: Tensor,
    *,
    theta_norm: float = DEFAULT_THETA_NORM,
    theta_inner: float = DEFAULT_THETA_INNER,
    nu_ortho: float = DEFAULT_NU_ORTHO,
    eps: float | None = None,
) -> dict[str, float]:
    """``noise/<test>``, ``noise/suggested_batch/<test>`` and ``noise/theta/<test>`` values.

    Args:
        train_gram: (N, N) Gram matrix of the train probe (N ≥ 2).
        theta_norm: θ of the norm test for the suggested batch size.
        theta_inner: θ of the inner-product test.
        nu_ortho: ν of the orthogonality test.
        eps: Unit roundoff of the dtype the Gram was computed in (see
            :func:`~stiffmon_agent.metrics.gradient_tests.gradient_tests`).
    """
    t = gradient_tests(train_gram, eps=eps)
    suggested = t.suggested_batch(theta_norm, theta_inner, nu_ortho)
    values = (t.norm_test, t.inner_product_test, t.orthogonality_test)
    out: dict[str, float] = {f"noise/{k}": v for k, v in zip(TESTS, values, strict=True)}
    out.update({f"noise/suggested_batch/{k}": suggested[k] for k in TESTS})
    thetas = (theta_norm, theta_inner, nu_ortho)
    out.update({f"noise/theta/{k}": v for k, v in zip(TESTS, thetas, strict=True)})
    return out


def density_messages(
    model: nn.Module,
    loss_fn: LossFn,
    probe: ProbeSet,
    step: int,
    *,
    forward: ForwardFn | None = None,
    runs: int = 2,
    steps: int = 32,
    trace_samples: int = 8,
    points: int = 128,
    sigma_relative: float = 0.01,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    scale: float = 1.0,
    train: tuple[Batch, Batch] | None = None,
    wrap: Callable[[HessianOperator], MatVec] | None = None,
    restrict: bool | None = None,
) -> list[Outgoing]:
    """Spectral density (SLQ) and Hutchinson trace of the train-probe Hessian.

    Costs ``runs · steps + trace_samples`` Hessian-vector products; each SLQ run's Rademacher
    start doubles as a trace sample, so the trace pools ``runs + trace_samples`` samples.

    Args:
        model: The network (measured in eval mode, restored afterwards).
        loss_fn: The training loss.
        probe: The probe set (its train part is used).
        step: Training step of the measurement.
        forward: ``forward(model, inputs)``.
        runs: Lanczos runs R.
        steps: Lanczos steps m per run.
        trace_samples: Extra single-product Hutchinson samples.
        points: Grid points of the published density.
        sigma_relative: Broadening σ as a fraction of the Ritz values' spread.
        chunk_size: Examples per pass of the HVPs.
        generator: Random generator for the probe vectors.
        scale: The objective is ``scale`` × the per-example mean (B for a sum-reduced loss,
            as in the sharpness measurement).
        train: The examples this process computes (sharded: its shard); default the train probe.
        wrap: Turns the operator into the H v measured (see
            :func:`~stiffmon_agent.metrics.sharpness.hessian_eigen`).
        restrict: Run SLQ on the embedding rows the probe touches where that is exact and
            add the untouched rows' eigenvalue 0 as an exact point mass of weight |U|/P
            (:mod:`~stiffmon_agent.metrics.restricted_curvature`; the trace and every moment
            are the whole Hessian's); never with ``wrap``. None: where the untouched rows hold
            at least ``RESTRICT_MIN`` parameters, as sharpness; True: wherever exact.
    """
    t = time.time()
    x, y = train if train is not None else probe.train()

    def build() -> HessianOperator:
        return HessianOperator(
            model, x, y, loss_fn, forward=forward, chunk_size=chunk_size, scale=scale
        )

    with (
        measurement_mode(model),
        touched_operator(model, build, restrict=restrict, sharded=wrap is not None) as (op, rs),
    ):
        res = spectral_density(
            op if wrap is None else wrap(op),
            op.dim,
            runs=runs,
            steps=steps,
            trace_samples=trace_samples,
            like=op.like.detach(),
            generator=generator,
        )
        if rs is not None:
            res = with_zero_block(res, op.dim + rs.untouched)
    grid, dens, sigma = res.broadened(points=points, sigma=res.default_sigma(sigma_relative))
    lo, hi = res.support()
    trace, stderr = res.trace.mean, res.trace.stderr
    attrs: dict[str, float | int | str | None] = {
        "sigma": sigma,
        "grid": "linear",
        "broadening": "gaussian",
        "runs": res.runs,
        "steps": res.steps,
        "hvps": res.matvecs,
        "dim": res.dim,
        "ritz_min": lo,
        "ritz_max": hi,
        "zero_mass": res.zero_mass,
        "solved_dim": res.solved_dim or res.dim,
        "trace": trace if math.isfinite(trace) else None,
        "trace_stderr": stderr if math.isfinite(stderr) else None,
    }
    return [
        Outgoing(
            p.Curve,
            step,
            t,
            {"name": "hessian-density", "x": grid.numpy(), "y": dens.numpy(), "attrs": attrs},
        ),
        Outgoing(
            p.Scalars,
            step,
            t,
            {
                "values_names": ["curvature/trace", "curvature/trace_stderr", "curvature/hvps"],
                "values_raw": [trace, stderr, float(res.matvecs)],
            },
        ),
    ]
