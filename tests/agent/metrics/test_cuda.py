"""The metrics and the agent on a CUDA device, against the float64 CPU references.

Skipped where no CUDA device is visible (CI has none); run on a GPU machine with
``pytest tests/agent/metrics/test_cuda.py``. Each test moves a model of the CPU zoo
(:mod:`tests.agent.metrics.models`) to the GPU and compares what the GPU computes with the
independent brute-force references computed on the CPU: the per-example loop for the Gram, the
dense ``torch.autograd.functional`` Hessian for sharpness and trace, the explicit P×P covariance
for the noise. The whole agent is also run once on each device in float64 and every published
number compared, and its ``step()`` is checked not to wait for the GPU.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from stiffmon import protocol as p
from stiffmon.session import read_session
from stiffmon_agent import Agent
from stiffmon_agent.metrics import (
    HessianOperator,
    gradient_noise,
    hessian_eigen,
    hessian_trace,
    measurement_mode,
    per_example_gram,
)
from tests.agent.metrics.models import dict_case, make_cases
from tests.agent.metrics.reference import loop_gradients, loop_gram, rel_err
from tests.agent.metrics.test_sharpness import dense_hessian

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device visible (the CPU tests cover the rest)"
)

CE = nn.CrossEntropyLoss()
CASES = make_cases()
GPU = torch.device("cuda")


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    return x


def _on_gpu(name: str) -> tuple[nn.Module, Any, Tensor]:
    model, x, y = CASES[name]
    return copy.deepcopy(model).to(GPU), _to(x, GPU), y.to(GPU)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("method", ["auto", "ghost", "materialise", "vmap"])
def test_gram_on_the_gpu_matches_the_cpu_loop_reference(name: str, method: str) -> None:
    ref = loop_gram(*CASES[name], CE)
    got = per_example_gram(*_on_gpu(name), CE, method=method, chunk_size=4)  # type: ignore[arg-type]
    assert got.total.device.type == "cuda" and got.total.dtype == torch.float64
    assert rel_err(got.total.cpu(), ref) < 1e-10, got.methods


def test_gram_of_a_dict_batch_on_the_gpu() -> None:
    model, x, y, fwd = dict_case()
    ref = loop_gram(model, x, y, CE, fwd)
    got = per_example_gram(copy.deepcopy(model).to(GPU), _to(x, GPU), y.to(GPU), CE, forward=fwd)
    assert rel_err(got.total.cpu(), ref) < 1e-10


@pytest.mark.parametrize("name", ["mlp", "cnn", "conv1d", "layernorm", "transformer"])
def test_float32_gram_on_the_gpu_is_as_close_as_on_the_cpu(name: str) -> None:
    """What users run: float32 on the GPU (cuDNN may use TF32 for convolutions there)."""
    ref = loop_gram(*CASES[name], CE)
    model, x, y = CASES[name]
    cpu = per_example_gram(copy.deepcopy(model).float(), _to(_f32(x), torch.device("cpu")), y, CE)
    gpu_model, gx, gy = _on_gpu(name)
    gpu = per_example_gram(gpu_model.float(), _f32(gx), gy, CE)
    cpu_err, gpu_err = rel_err(cpu.total.double(), ref), rel_err(gpu.total.double().cpu(), ref)
    assert cpu_err < 1e-5
    assert gpu_err < 1e-5, (gpu_err, cpu_err)


def _f32(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.float() if x.is_floating_point() else x
    return x


@pytest.mark.parametrize("name", ["mlp", "cnn", "layernorm", "batchnorm"])
def test_top_eigenvalues_on_the_gpu_match_the_dense_hessian(name: str) -> None:
    model, x, y = CASES[name]
    ref = torch.linalg.eigvalsh(dense_hessian(model, x, y)).flip(0)
    got = hessian_eigen(
        *_on_gpu(name),
        CE,
        k=3,
        tol=1e-10,
        max_hvps=2000,
        generator=torch.Generator().manual_seed(0),
    )
    assert got.converged and got.eigenvalues.device.type == "cuda"
    torch.testing.assert_close(got.eigenvalues.cpu(), ref[:3], rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["graph", "func", "double-backward"])
def test_hvp_backends_on_the_gpu_match_the_dense_hessian(backend: str) -> None:
    h = dense_hessian(*CASES["cnn"])
    v = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model, x, y = _on_gpu("cnn")
    with measurement_mode(model):
        op = HessianOperator(model, x, y, CE, backend=backend)  # type: ignore[arg-type]
        torch.testing.assert_close(op(v.to(GPU)).cpu(), h @ v, rtol=1e-9, atol=1e-12)


def test_hessian_trace_on_the_gpu_is_within_three_standard_errors() -> None:
    model, x, y = CASES["mlp"]
    exact = float(torch.trace(dense_hessian(model, x, y)))
    got = hessian_trace(
        *_on_gpu("mlp"), CE, samples=200, generator=torch.Generator().manual_seed(0)
    )
    assert abs(got.mean - exact) <= 3 * got.stderr + 1e-9, (got.mean, exact, got.stderr)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_noise_on_the_gpu_matches_the_explicit_covariance(name: str) -> None:
    g = loop_gradients(*CASES[name], CE)
    n, mean = g.shape[0], g.mean(0)
    k_cov = sum(torch.outer(gi - mean, gi - mean) for gi in g) / n
    evals = torch.linalg.eigvalsh(k_cov).flip(0)
    got = gradient_noise(per_example_gram(*_on_gpu(name), CE).total, k=3)
    assert got.trace_k == pytest.approx(float(torch.trace(k_cov)), rel=1e-10)
    torch.testing.assert_close(got.eigenvalues.cpu(), evals[:3], rtol=1e-9, atol=1e-12)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.LayerNorm(4 * 6 * 6)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(torch.relu(self.conv(x)).flatten(1)))


def _agent_run(device: torch.device, tmp: Path) -> list[Any]:
    torch.manual_seed(0)
    model = _Net().double().to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 6, 6, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, 3, (48,), generator=g).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    rec = tmp / f"{device.type}.stiff"
    agent = Agent(
        model,
        CE,
        opt,
        probe=(x[:18], y[:18]),
        val_probe=(x[18:24], y[18:24]),
        endpoint="",
        record=rec,
        gram_every=1,
        sharpness_every=1,
        density_every=2,
        overhead_cap=1.0,
        hessian_tol=1e-8,
        max_hvps=200,
        distance_layers=["norm"],
        registry=False,
    )
    for s in range(4):
        xb, yb = x[24 + 6 * s : 30 + 6 * s], y[24 + 6 * s : 30 + 6 * s]
        out = model(xb)
        loss = CE(out, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        agent.step(loss, out, yb)
    agent.close()
    assert not agent.disabled, agent.disabled
    return read_session(rec)[0]


_TIMINGS = ("time", "seconds", "overhead", "cost", "ms", "budget")


def _numbers(msgs: list[Any]) -> dict[tuple[str, int, str], np.ndarray]:
    """(kind/name, step, field) -> values of every measurement message, timings left out."""
    out: dict[tuple[str, int, str], np.ndarray] = {}
    for m in msgs:
        if isinstance(m, p.Scalars):
            for k, v in m.as_dict().items():
                if not any(t in k for t in _TIMINGS):
                    out[("scalars", m.step, k)] = np.array([v])
        elif isinstance(m, p.Columns):
            for k, v in zip(m.names, m.values, strict=True):
                for step, value in zip(m.steps.tolist(), np.asarray(v).tolist(), strict=True):
                    out[("column", step, k)] = np.array([value])
        elif isinstance(m, p.Matrix | p.Curve | p.Spectrum):
            for f, _ in m.ARRAY_FIELDS:
                out[(f"{m.kind}/{m.name}", m.step, f)] = np.asarray(getattr(m, f), np.float64)
    return out


def test_the_agent_publishes_the_same_numbers_on_the_gpu_as_on_the_cpu(tmp_path: Path) -> None:
    cpu, gpu = (
        _numbers(_agent_run(torch.device("cpu"), tmp_path)),
        _numbers(_agent_run(GPU, tmp_path)),
    )
    assert cpu.keys() == gpu.keys()
    kinds = {k[0].split("/")[0] for k in cpu}
    assert {"matrix", "curve", "spectrum", "scalars", "column"} <= kinds, kinds
    for key, a in cpu.items():
        b = gpu[key]
        assert a.shape == b.shape, key
        np.testing.assert_allclose(b, a, rtol=1e-7, atol=1e-10, equal_nan=True, err_msg=str(key))


def _stalls(tmp_path: Path, accuracy: bool) -> tuple[list[float], list[float], list[float]]:
    """With ~0.1 s of GPU work queued before each step: how long ``agent.step`` took, how long
    each of the training thread's next kernel launches took while the publisher thread read the
    batch, and how much GPU work was still queued after them (seconds)."""
    torch.manual_seed(0)
    model = nn.Linear(8, 3).to(GPU)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = tmp_path / "r.stiff"
    agent = Agent(
        model,
        CE,
        opt,
        endpoint="",
        record=rec,
        registry=False,
        gram_every="never",
        batch_interval=0.0,  # every step is a batch: the publisher reads while the GPU is busy
        idle_batch_interval=None,  # also with nobody subscribed
    )
    x, y = torch.randn(16, 8, device=GPU), torch.randint(0, 3, (16,), device=GPU)
    w = torch.randn(256, 256, device=GPU)

    def step() -> None:
        out = model(x)
        loss = CE(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        t0 = time.perf_counter()
        agent.step(loss, out, y) if accuracy else agent.step(loss)
        steps.append(time.perf_counter() - t0)

    steps: list[float] = []
    launches: list[float] = []
    queued: list[float] = []
    for _ in range(3):  # warm up: the first step announces, allocates, initialises cuBLAS
        step()
        w @ w
    torch.cuda.synchronize()
    steps.clear()
    for _ in range(4):
        torch.cuda._sleep(int(2e8))  # ~0.1 s of GPU time queued before the step
        step()
        for _ in range(30):  # the loop's next work while the publisher reads the batch
            time.sleep(0.001)
            t0 = time.perf_counter()
            w @ w
            launches.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch.cuda.synchronize()
        queued.append(time.perf_counter() - t0)
    agent.close()
    cols = [m for m in read_session(rec)[0] if isinstance(m, p.Columns)]
    got = {n: np.concatenate([m.values[m.names.index(n)] for m in cols]) for n in cols[0].names}
    assert len(got["loss"]) == 7 and np.isfinite(got["loss"]).all()
    if accuracy:
        assert ((got["accuracy"] >= 0) & (got["accuracy"] <= 1)).all()
    return steps, launches, queued


def _assert_no_stall(steps: list[float], launches: list[float], queued: list[float]) -> None:
    seen = f"steps {steps}, slowest launches {sorted(launches)[-3:]}, left queued {queued}"
    assert max(steps) < 0.01, seen
    assert max(launches) < 0.01, seen
    assert min(queued) > 0.02, f"the GPU was not busy: the test cannot tell ({seen})"


def test_the_per_step_stream_never_makes_training_wait_for_the_gpu(tmp_path: Path) -> None:
    """A GPU loss is read on the publisher thread without a blocking call: the training thread's
    step and launches go on while 0.1 s of GPU work is queued. Measured on an H100: with the
    previous pageable ``.cpu()`` read, each launch waited 10–15 ms and the next forward pass
    ~80 ms; with this read, launches take ≤ 0.2 ms and ~64 ms of work is still queued after them.
    """
    _assert_no_stall(*_stalls(tmp_path, accuracy=False))


@pytest.mark.xfail(
    strict=True,
    reason="known, open: on an H100 (session 9) agent.step(loss, logits, targets) with GPU "
    "logits made the training thread wait 36–63 ms behind 0.1 s of queued GPU work, and its "
    "hit count costs ~135 µs of a 1.6 ms step; the loss alone no longer stalls. Cause not found "
    "in the device time that session had.",
)
def test_the_accuracy_never_makes_training_wait_for_the_gpu(tmp_path: Path) -> None:
    _assert_no_stall(*_stalls(tmp_path, accuracy=True))


def test_a_cuda_graph_s_static_loss_reaches_the_file_step_by_step(tmp_path: Path) -> None:
    """A whole training step captured in a CUDA graph (the PyTorch docs' recipe) writes every
    replay's loss into the same static tensor: each row keeps its own step's value (the agent
    copies a GPU loss at ``step()``; a kept view would read whatever the last replay wrote)."""
    torch.manual_seed(0)
    model = nn.Linear(8, 3).to(GPU)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    static_x = torch.randn(16, 8, device=GPU)
    static_y = torch.randint(0, 3, (16,), device=GPU)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as the recipe says
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(static_x), static_y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = nn.functional.cross_entropy(model(static_x), static_y)
        static_loss.backward()
        opt.step()
    rec = tmp_path / "graph.stiff"
    agent = Agent(model, CE, opt, endpoint="", record=rec, registry=False)
    expected = []
    for _ in range(20):
        static_x.copy_(torch.randn(16, 8, device=GPU))
        graph.replay()
        agent.step(static_loss)
        expected.append(static_loss.item())  # in the test only: waits for the replay
    agent.close()
    got = np.concatenate(
        [m.column("loss") for m in read_session(rec)[0] if isinstance(m, p.Columns)]
    )
    assert len(set(expected)) == 20
    np.testing.assert_allclose(got, expected, rtol=1e-6)
