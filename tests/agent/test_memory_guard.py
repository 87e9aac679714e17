"""The memory guard of the curvature measurements: cap, skip, and survive out-of-memory.

The free memory is faked (``free_bytes`` patched) so the tests decide what fits; the guard
prices (3 n + 13 + 6 (k + 1)) vectors of P numbers for n Lanczos products, (n + 10) for an
n-step SLQ run, against half of what is free.
"""

from __future__ import annotations

import math
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from stiffmon import protocol as p
from stiffmon_agent import agent as agent_module
from stiffmon_agent import memory_guard
from stiffmon_agent.metrics import HessianOperator
from tests.agent.recording import (
    close_and_read,
    events,
    metric_errors,
    offline_agent,
    scalar_values,
    train_step,
)

VECTOR = 67 * 4  # P = 67 float32 parameters of the model below


def model_and_data() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay: one reference
    return model, opt, torch.randn(16, 4), torch.randint(0, 3, (16,))


def run(tmp_path: Path, steps: int = 3, **settings: Any) -> tuple[Any, list[Any], nn.Module]:
    model, opt, x, y = model_and_data()
    rec = tmp_path / "r.stiff"
    base: dict[str, Any] = {
        "probe": (x[:12], y[:12]),
        "gram_every": "never",
        "sharpness_every": 1,
        "density_every": "never",
        "overhead_cap": None,
        "batch_size": 16,
    }
    agent = offline_agent(model, nn.CrossEntropyLoss(), opt, rec, **(base | settings))
    for _ in range(steps):
        out = model(x)
        train_step(agent, opt, nn.functional.cross_entropy(out, y), out, y)
    return agent, close_and_read(agent, rec), model


def reference_lambda1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """λ1 of the dense float64 Hessian of the mean cross-entropy on (x, y)."""
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    names, shapes = list(params), [v.shape for v in params.values()]
    sizes = [v.numel() for v in params.values()]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        chunks = [c.view(s) for c, s in zip(flat.split(sizes), shapes, strict=True)]
        parts = dict(zip(names, chunks, strict=True))
        out = torch.func.functional_call(model, parts, (x.double(),))
        return nn.functional.cross_entropy(out, y)

    flat = torch.cat([v.reshape(-1) for v in params.values()])
    h = torch.autograd.functional.hessian(loss, flat)
    return float(torch.linalg.eigvalsh(h)[-1])


def fake_free(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    monkeypatch.setattr(memory_guard, "free_bytes", lambda device: free)


def test_cap_is_said_once_and_the_capped_value_matches_the_dense_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fit = 10  # 0.5 · free / vector = 3 · 10 + 25
    fake_free(monkeypatch, 2 * (3 * fit + 25) * VECTOR)
    agent, msgs, model = run(tmp_path, max_hvps=50)
    capped = events(msgs, "memory-capped")
    assert len(capped) == 1, capped
    assert capped[0].level == "warning"
    assert capped[0].attrs["products"] == fit and capped[0].attrs["configured"] == 50
    assert capped[0].attrs["free_bytes"] == 2 * (3 * fit + 25) * VECTOR
    hvps = scalar_values(msgs, "sharpness/hvps")
    assert len(hvps) == 3 and max(hvps) <= fit, hvps
    _, _, x, y = model_and_data()
    ref = reference_lambda1(model, x[:12], y[:12])
    ours = scalar_values(msgs, "sharpness/lambda1_h")
    spectra = [m for m in msgs if isinstance(m, p.Spectrum) and m.name == "hessian"]
    for lam, spec in zip(ours, spectra, strict=True):  # capped: converged, or it says not
        assert lam <= ref * (1 + 1e-6)  # a Ritz value never overestimates
        assert not spec.attrs["converged"] or abs(lam - ref) <= 1e-2 * abs(ref), (lam, ref)
    assert abs(ours[-1] - ref) <= 1e-4 * abs(ref), (ours, ref)  # warm: 1e-5 measured
    assert agent.disabled == {}


def test_skip_when_not_even_the_minimum_fits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_free(monkeypatch, 1000)
    agent, msgs, _ = run(tmp_path, density_every=1, density_steps=8, density_runs=1)
    skipped = [e for e in events(msgs, "measurement-skipped") if e.attrs["reason"] == "memory"]
    assert {e.attrs["kind"] for e in skipped} == {"sharpness", "density"}
    for e in skipped:
        assert e.level == "warning" and e.attrs["free_bytes"] == 1000
        assert e.attrs["needed_bytes"] > 1000 and "only" in e.message, e.message
    assert scalar_values(msgs, "sharpness/lambda1_h") == []
    assert scalar_values(msgs, "curvature/trace") == []
    assert scalar_values(msgs, "coverage/sharpness/skipped")[-1] == 3  # every step, on
    assert agent.disabled == {} and metric_errors(msgs) == {}


def test_density_steps_are_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_free(monkeypatch, 2 * (5 + 10) * VECTOR)  # 5 steps per run fit
    _, msgs, _ = run(tmp_path, sharpness_every="never", density_every=1, density_steps=16)
    dens = [m for m in msgs if isinstance(m, p.Curve) and m.name == "hessian-density"]
    assert dens and all(m.attrs["steps"] == 5 for m in dens)
    assert [e.attrs["products"] for e in events(msgs, "memory-capped")] == [5]


def test_out_of_memory_is_caught_and_lowers_the_next_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_free(monkeypatch, 2**40)  # the guard lets the whole budget through
    real_call = HessianOperator.__call__
    calls = {"n": 0}

    def oom_once(self: HessianOperator, v: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 4:  # in the middle of the first measurement's Lanczos
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 38.00 GiB")
        return real_call(self, v)

    budgets: list[int] = []
    real_sharpness = agent_module.sharpness_messages

    def spy(*args: Any, **kwargs: Any) -> Any:
        budgets.append(kwargs["max_hvps"])
        return real_sharpness(*args, **kwargs)

    monkeypatch.setattr(HessianOperator, "__call__", oom_once)
    monkeypatch.setattr(agent_module, "sharpness_messages", spy)
    agent, msgs, _ = run(tmp_path, steps=3, max_hvps=40)
    assert budgets == [40, 20, 20], budgets
    oom = [e for e in events(msgs, "measurement-skipped") if e.attrs["reason"] == "out-of-memory"]
    assert len(oom) == 1 and oom[0].level == "warning" and oom[0].attrs["max_products"] == 20
    assert "OutOfMemoryError" in oom[0].message and "38.00 GiB" in oom[0].message
    lam = scalar_values(msgs, "sharpness/lambda1_h")
    assert len(lam) == 2 and all(math.isfinite(v) for v in lam)  # the next ones ran
    assert max(scalar_values(msgs, "sharpness/hvps")) <= 20
    assert agent.disabled == {} and metric_errors(msgs) == {}


def test_release_frees_what_the_failed_frames_held() -> None:
    ref: list[weakref.ref[torch.Tensor]] = []

    def measurement() -> None:
        basis = torch.zeros(1000)
        ref.append(weakref.ref(basis))
        raise MemoryError("no room")

    try:
        measurement()
    except MemoryError as exc:
        assert ref[0]() is not None  # the traceback keeps the basis alive
        memory_guard.release(exc)
        assert ref[0]() is None


def test_out_of_memory_recognised() -> None:
    assert memory_guard.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert memory_guard.is_out_of_memory(MemoryError())
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory")
    assert memory_guard.is_out_of_memory(cpu)
    assert not memory_guard.is_out_of_memory(RuntimeError("shape mismatch"))
