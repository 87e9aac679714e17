"""Sharpness against the dense Hessian; warm start; stability thresholds; eigen-solvers."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from stiffmon_agent.metrics import (
    HessianOperator,
    hessian_eigen,
    hessian_trace,
    hutchinson_trace,
    lanczos,
    measurement_mode,
    power_iteration,
    stability_threshold,
    stability_threshold_for,
)
from stiffmon_agent.metrics.gram import per_example_gram
from tests.agent.metrics.models import make_cases
from tests.agent.metrics.reference import dense_hessian_of, loop_gram, rel_err

CE = nn.CrossEntropyLoss()


def dense_hessian(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Dense Hessian of the mean loss via torch.autograd.functional.hessian, in eval mode."""
    was = model.training
    model.eval()
    h = dense_hessian_of(model, x, lambda out: CE(out, y))
    model.train(was)
    return h


@pytest.mark.parametrize("name", ["mlp", "cnn", "layernorm", "batchnorm"])
@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top_eigenvalues_match_dense_hessian(name: str, method: str) -> None:
    model, x, y = make_cases()[name]
    ref = torch.linalg.eigvalsh(dense_hessian(model, x, y)).flip(0)
    k = 3 if method == "lanczos" else 1
    got = hessian_eigen(
        model,
        x,
        y,
        CE,
        k=k,
        method=method,
        tol=1e-10,
        max_hvps=2000,  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(0),
    )
    assert got.converged
    if method == "power":  # power iteration finds the largest |λ|
        target = ref[ref.abs().argmax()]
        assert float(got.eigenvalues[0]) == pytest.approx(float(target), rel=1e-6)
    else:
        torch.testing.assert_close(got.eigenvalues, ref[:k], rtol=1e-6, atol=0)


def test_hvp_backends_and_chunks_agree_with_dense() -> None:
    model, x, y = make_cases()["cnn"]
    h = dense_hessian(model, x, y)
    v = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with measurement_mode(model):
        for backend in ("graph", "func", "double-backward"):
            for chunk in (None, 3) if backend != "graph" else (None,):
                op = HessianOperator(model, x, y, CE, backend=backend, chunk_size=chunk)  # type: ignore[arg-type]
                torch.testing.assert_close(op(v), h @ v, rtol=1e-9, atol=1e-12)
                assert op.calls == 1
                torch.testing.assert_close(op(2 * v), 2 * (h @ v), rtol=1e-9, atol=1e-12)


def test_warm_start_needs_fewer_hvps_than_cold_start() -> None:
    model, x, y = make_cases()["mlp"]
    gen = torch.Generator().manual_seed(0)
    first = hessian_eigen(model, x, y, CE, tol=1e-3, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    warm_counts, cold_counts = [], []
    prev = first.eigenvectors
    for _ in range(5):
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
        warm = hessian_eigen(model, x, y, CE, tol=1e-3, warm_start=prev, generator=gen)
        cold = hessian_eigen(model, x, y, CE, tol=1e-3, generator=gen)
        assert float(warm.eigenvalues[0]) == pytest.approx(float(cold.eigenvalues[0]), rel=1e-2)
        warm_counts.append(warm.matvecs)
        cold_counts.append(cold.matvecs)
        prev = warm.eigenvectors
    assert sum(warm_counts) < sum(cold_counts), (warm_counts, cold_counts)
    assert max(warm_counts) <= min(cold_counts)


def test_power_iteration_warm_start() -> None:
    a = torch.diag(torch.tensor([10.0, 9.0, 1.0, 0.5], dtype=torch.float64))
    q, _ = torch.linalg.qr(
        torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )
    a = q @ a @ q.T
    cold = power_iteration(
        lambda v: a @ v, 4, tol=1e-8, max_matvecs=1000, generator=torch.Generator().manual_seed(1)
    )
    warm = power_iteration(lambda v: a @ v, 4, tol=1e-8, init=cold.eigenvectors, max_matvecs=1000)
    assert float(cold.eigenvalues[0]) == pytest.approx(10.0, rel=1e-6)
    assert warm.matvecs < cold.matvecs and warm.matvecs <= 3


def test_lanczos_on_known_spectrum_and_invariant_subspace() -> None:
    evals = torch.tensor([5.0, 3.0, 3.0, -7.0, 0.1, 0.0], dtype=torch.float64)
    q, _ = torch.linalg.qr(
        torch.randn(6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    )
    a = q @ torch.diag(evals) @ q.T
    got = lanczos(lambda v: a @ v, 6, k=3, tol=1e-12, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got.eigenvalues, torch.tensor([5.0, 3.0, 3.0], dtype=torch.float64))
    # starting from an exact eigenvector converges with one product (k=1)
    one = lanczos(lambda v: a @ v, 6, k=1, init=q[:, 0], tol=1e-8)
    assert one.matvecs == 1 and float(one.eigenvalues[0]) == pytest.approx(5.0)
    # k=2 from that eigenvector: the invariant subspace forces a restart, still exact
    two = lanczos(
        lambda v: a @ v, 6, k=2, init=q[:, 0], tol=1e-10, generator=torch.Generator().manual_seed(4)
    )
    torch.testing.assert_close(two.eigenvalues, torch.tensor([5.0, 3.0], dtype=torch.float64))
    for i in range(2):
        v = two.eigenvectors[:, i]
        torch.testing.assert_close(a @ v, two.eigenvalues[i] * v, rtol=1e-8, atol=1e-8)


def test_hutchinson_trace() -> None:
    model, x, y = make_cases()["mlp"]
    h = dense_hessian(model, x, y)
    est = hessian_trace(model, x, y, CE, samples=300, generator=torch.Generator().manual_seed(0))
    assert abs(est.mean - float(h.trace())) < 4 * est.stderr + 1e-9
    diag = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    exact = hutchinson_trace(lambda v: diag @ v, 3, samples=5)
    assert exact.mean == pytest.approx(6.0) and exact.stderr == pytest.approx(0.0)


def test_stability_thresholds() -> None:
    assert stability_threshold(0.1).value == pytest.approx(20.0)
    assert stability_threshold(0.1, 0.9).value == pytest.approx(38.0)
    assert stability_threshold(0.1, 0.9, nesterov=True).value == pytest.approx(3.8 / (2.8 * 0.1))
    assert stability_threshold(0.1, 0.9, dampening=0.5).value == pytest.approx(76.0)
    p = [nn.Parameter(torch.zeros(1))]
    sgd = torch.optim.SGD(p, lr=0.05, momentum=0.5, nesterov=True)
    t = stability_threshold_for(sgd)
    assert t.value == pytest.approx(3.0 / (2.0 * 0.05)) and "1+2β" in t.rule
    adam = stability_threshold_for(torch.optim.Adam(p, lr=1e-3))
    assert adam.value is None and "Adam" in adam.rule and "adaptive" in adam.rule
    assert stability_threshold(0.0).value is None


def test_sum_reduced_objective_is_batch_times_the_mean() -> None:
    """MSE(sum) with 3-d targets: G and λ1_H of Σ over the batch, against dense references."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.randn(9, 3, generator=g, dtype=torch.float64)
    mse_sum = nn.MSELoss(reduction="sum")
    # Gram: per-example contributions are the per-example sums (d = 3 dimensions)
    ref = loop_gram(model, x, y, mse_sum)
    assert rel_err(per_example_gram(model, x, y, mse_sum).total, ref) < 1e-10
    mean_ref = loop_gram(model, x, y, nn.MSELoss())
    assert rel_err(per_example_gram(model, x, y, nn.MSELoss()).total, mean_ref) < 1e-10
    # Hessian of the training objective Σ_i L_i over a batch of B = 9 (the probe itself)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(v: Tensor) -> Tensor:
        parts = v.split([s.numel() for s in shapes])
        pd = {n: c.view(s) for n, c, s in zip(names, parts, shapes, strict=True)}
        return mse_sum(torch.func.functional_call(model, pd, (x,)), y)

    lam = float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))[-1])
    got = hessian_eigen(model, x, y, mse_sum, scale=9, tol=1e-10, max_hvps=500)
    assert float(got.eigenvalues[0]) == pytest.approx(lam, rel=1e-8)
    mean = hessian_eigen(model, x, y, nn.MSELoss(), tol=1e-10, max_hvps=500)
    assert float(mean.eigenvalues[0]) * 27 == pytest.approx(lam, rel=1e-8)  # B·d = 27


def test_cold_start_finds_lambda1_when_lambda2_is_close() -> None:
    """λ1 and λ2 3 % apart: a cold start must return λ1 (within 1 %), not λ2."""
    gen = torch.Generator().manual_seed(0)
    dim, misses = 2000, 0
    for _ in range(40):
        ev = torch.cat(
            [
                torch.tensor([1.0, 0.97], dtype=torch.float64),
                torch.rand(8, generator=gen, dtype=torch.float64) * 0.6 + 0.2,
                torch.randn(dim - 10, generator=gen, dtype=torch.float64) * 0.02,
            ]
        )
        got = lanczos(lambda v, ev=ev: ev * v, dim, tol=1e-2, generator=gen)
        misses += abs(float(got.eigenvalues[0]) - 1.0) > 0.01
    one = sum(
        abs(
            float(lanczos(lambda v: ev * v, dim, tol=1e-2, block=1, generator=gen).eigenvalues[0])
            - 1
        )
        > 0.01
        for _ in range(40)
    )
    assert misses == 0 and one > 0, (misses, one)  # the single-vector start does miss it


def test_warm_sequence_along_training_matches_dense_hessian() -> None:
    """Warm-started λ1_H (raw and preconditioned D H D) along SGD steps, each within 1 % of
    ``eigvalsh`` of the dense float64 Hessian; the start block carries k + 1 vectors."""
    model, x, y = make_cases()["mlp"]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    warm = warm_p = None
    counts = []
    for step in range(6):
        h = dense_hessian(model, x, y)
        d = torch.rand(h.shape[0], generator=gen, dtype=torch.float64) + 0.5  # P changes too
        ref = float(torch.linalg.eigvalsh(h)[-1])
        ref_p = float(torch.linalg.eigvalsh(h * torch.outer(d, d).rsqrt())[-1])
        got = hessian_eigen(model, x, y, CE, warm_start=warm, generator=gen)
        got_p = hessian_eigen(model, x, y, CE, warm_start=warm_p, generator=gen, preconditioner=d)
        assert got.converged and got_p.converged
        assert got.warm_start.shape[1] == 2 and got.eigenvectors.shape[1] == 1
        assert float(got.eigenvalues[0]) == pytest.approx(ref, rel=1e-2)
        assert float(got_p.eigenvalues[0]) == pytest.approx(ref_p, rel=1e-2)
        warm, warm_p = got.warm_start, got_p.warm_start
        if step:
            counts.append(got.matvecs)
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
    assert max(counts) <= 6, counts


def test_the_first_measurement_raises_no_torchscript_warning_of_torchs_own() -> None:
    """torch.func.jvp loads forward-mode AD decompositions with torch.jit.script at its first use,
    which warns "torch.jit.script is deprecated" on the user's console: not in a fresh process."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "from stiffmon_agent.metrics.sharpness import hessian_eigen\n"
        "m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))\n"
        "x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))\n"
        "r = hessian_eigen(m, x, y, torch.nn.CrossEntropyLoss(), backend='func')\n"
        "print('lambda', float(r.eigenvalues[0]))\n"
    )
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'agent'}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "lambda" in done.stdout
    assert "jit.script" not in done.stderr, done.stderr[-2000:]
