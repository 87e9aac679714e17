"""Trials in threads of one process (Optuna ``n_jobs=4``, Ray Tune's local mode, a hand-written
``ThreadPoolExecutor`` sweep): each thread builds its model, optimizer and agent and trains.

Checked against references of our own: two measurements in two threads leave the process's
SDPA backend flags as they were (before, interleaved save/restore left attention on the math
kernel for good); a measurement in one thread does not rewind the global random draws another
thread made meanwhile (before, they came again, repeated); two agents trained concurrently each
record every step, say bye, carry distinct run ids, warn once that they share the process, give
losses bit-identical to the same trial run alone (per-trial generators), and measure λ1_H and
Tr K equal to a dense float64 Hessian and a per-example gradient loop.
"""

from __future__ import annotations

import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from stiffmon import protocol as p
from stiffmon_agent.metrics.state import measurement_mode
from tests.agent.recording import (
    EXACT,
    close_and_read,
    events,
    offline_agent,
    scalar_values,
    step_rows,
)

try:
    from torch.nn.attention import _cur_sdpa_kernel_backends as sdpa_backends
except ImportError:  # pragma: no cover - older torch
    sdpa_backends = None

STEPS, N = 6, 24


def test_interleaved_measurements_in_two_threads_leave_the_sdpa_backends_alone() -> None:
    """A enters, B tries to enter, A leaves, B leaves: the flags afterwards are the start's."""
    if sdpa_backends is None:
        pytest.skip("no torch.nn.attention")
    before = sdpa_backends()
    a_in, a_out = threading.Event(), threading.Event()

    def a() -> None:
        with measurement_mode(nn.Linear(2, 2)):
            a_in.set()
            time.sleep(0.3)  # B tries to measure meanwhile
        a_out.set()

    def b() -> None:
        a_in.wait(5)
        with measurement_mode(nn.Linear(2, 2)):
            a_out.wait(5)  # leaves after A (at once where it had to wait for A)

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sdpa_backends() == before
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()


def test_a_measurement_in_a_thread_does_not_rewind_another_threads_draws() -> None:
    """The main thread draws while a worker measures; its next draws are new ones, not those."""
    inside, done = threading.Event(), threading.Event()

    def measure() -> None:
        with measurement_mode(nn.Linear(2, 2)):
            inside.set()
            done.wait(5)

    t = threading.Thread(target=measure)
    t.start()
    inside.wait(5)
    first = (torch.rand(4), np.random.rand(4), random.random())
    done.set()
    t.join(10)
    again = (torch.rand(4), np.random.rand(4), random.random())
    assert not torch.equal(first[0], again[0]), "torch's global draws repeated"
    assert not (first[1] == again[1]).all(), "numpy's global draws repeated"
    assert first[2] != again[2], "Python's random draws repeated"


def _trial(seed: int, rec: Path | None) -> tuple[list[float], nn.Module, Tensor, Tensor, list]:
    """One trial: its own generator for the weights and the data, its model, optimizer and
    agent (none with ``rec`` None: the trial alone, without any agent)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    with torch.no_grad():
        for q in model.parameters():
            q.copy_(torch.randn(q.shape, generator=g, dtype=torch.float64) * 0.7)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    loss_fn = nn.CrossEntropyLoss()
    agent = None
    if rec is not None:
        agent = offline_agent(model, loss_fn, opt, rec, probe=(x, y), **EXACT)
    losses = []
    for _ in range(STEPS):
        noise = 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)
        loss = loss_fn(model(x + noise), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if agent is not None:
            agent.step(loss)
    msgs = close_and_read(agent, rec) if agent is not None and rec is not None else []
    return losses, model, x, y, msgs


def _dense_lambda1(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top eigenvalue of the dense Hessian of the mean loss (torch.autograd.functional)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [q.shape for q in model.parameters()]
    flat = torch.cat([q.detach().reshape(-1) for q in model.parameters()])

    def loss(v: Tensor) -> Tensor:
        chunks = v.split([math.prod(s) for s in shapes])
        views = (c.view(s) for c, s in zip(chunks, shapes, strict=True))
        parts = dict(zip(names, views, strict=True))
        return nn.functional.cross_entropy(torch.func.functional_call(model, parts, (x,)), y)

    h = torch.autograd.functional.hessian(loss, flat)
    return float(torch.linalg.eigvalsh(h)[-1])


def _loop_trace_k(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Tr K = (1/N) Σ_i ‖g_i − ḡ‖², g_i by one backward per example."""
    rows = []
    for i in range(N):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([q.grad.reshape(-1) for q in model.parameters()]))
    g = torch.stack(rows)
    return float(((g - g.mean(0)) ** 2).sum(1).mean())


def test_two_trials_in_threads_measure_and_record_like_each_alone(tmp_path: Path) -> None:
    alone = {s: _trial(s, None)[0] for s in (1, 2)}
    with ThreadPoolExecutor(2) as pool:
        futures = {s: pool.submit(_trial, s, tmp_path / f"t{s}.stiff") for s in (1, 2)}
        results = {s: f.result(timeout=120) for s, f in futures.items()}
    runs = set()
    for s, (losses, model, x, y, msgs) in results.items():
        assert losses == alone[s], "a trial's losses changed because another one measured"
        hello = next(m for m in msgs if isinstance(m, p.Hello))
        runs.add(hello.run)
        assert isinstance(msgs[-1], p.Bye)
        rows = step_rows(msgs)
        assert rows == list(enumerate(losses)), "every step is recorded with its loss"
        lam = scalar_values(msgs, "sharpness/lambda1_h")
        tr = scalar_values(msgs, "noise/trace_k")
        assert len(lam) == STEPS and len(tr) == STEPS
        ref_lam, ref_tr = _dense_lambda1(model, x, y), _loop_trace_k(model, x, y)
        print(
            f"trial {s}: λ1_H {lam[-1]!r} vs {ref_lam!r} (rel {abs(lam[-1] / ref_lam - 1):.1e}), "
            f"Tr K {tr[-1]!r} vs {ref_tr!r} (rel {abs(tr[-1] / ref_tr - 1):.1e})"
        )
        assert lam[-1] == pytest.approx(ref_lam, rel=1e-8)
        assert tr[-1] == pytest.approx(ref_tr, rel=1e-9)
    assert len(runs) == 2


def test_each_trial_in_a_thread_says_it_shares_the_process(tmp_path: Path) -> None:
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_trial, s, tmp_path / f"t{s}.stiff") for s in (1, 2)]
        results = [f.result(timeout=120) for f in futures]
    for *_, msgs in results:
        said = events(msgs, "threads-shared-state")
        assert len(said) == 1 and said[0].level == "warning", "no word of the shared process"
