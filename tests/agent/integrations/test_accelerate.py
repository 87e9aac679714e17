"""A plain Accelerate loop (``accelerator.prepare``, ``accelerator.backward``, the prepared
optimizer and scheduler) with :class:`~stiffmon_agent.integrations.accelerate.AccelerateAgent`,
checked against float64 references: λ1_H against the dense Hessian of the probe's mean loss, the
Gram's noise trace against per-example gradients from one backward pass each, the threshold
2(1 + μ)/η against the lr the optimizer's step used, and the recorded columns against the loop.
The ``test_plain_agent_*`` tests are the plain ``Agent`` in the same loops: it takes the torch
optimizer inside the prepared one and measures through the model's own ``forward``."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from stiffmon import protocol as p
from stiffmon.session import read_session
from tests.agent.metrics.reference import dense_hessian_of, loop_gram
from tests.agent.recording import EXACT, events, last_scalar, offline_agent

accelerate = pytest.importorskip("accelerate")

from stiffmon_agent.integrations.accelerate import AccelerateAgent  # noqa: E402

MOMENTUM = 0.9


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    """Each test's Accelerator starts from a fresh (process-wide) accelerate state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _plain64(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` with its class's own forward (no autocast wrapper)."""
    m = copy.deepcopy(model).double()
    m.__dict__.pop("forward", None)
    m.__dict__.pop("_original_forward", None)
    return m


def _ref_lambda1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> float:
    h = dense_hessian_of(
        _plain64(model), x.double(), lambda out: scale * nn.functional.cross_entropy(out, y)
    )
    return float(torch.linalg.eigvalsh(0.5 * (h + h.T))[-1])


def _ref_trace_k(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """(1/N) Σ‖g_i − ḡ‖² from the loop Gram."""
    g = loop_gram(_plain64(model), x.double(), y, nn.functional.cross_entropy)
    c = g - g.mean(0, keepdim=True) - g.mean(1, keepdim=True) + g.mean()
    return float(c.diagonal().sum() / g.shape[0])


def _columns(rec: Path) -> dict[str, np.ndarray]:
    msgs = read_session(rec)[0]
    cols = [m for m in msgs if isinstance(m, p.Columns)]
    names = {n for c in cols for n in c.names}
    return {n: np.concatenate([c.column(n) for c in cols if n in c.names]) for n in names}


def _loop(
    tmp_path: Path,
    *,
    k: int = 1,
    micro: int = 16,
    epochs: int = 2,
    precision: str = "no",
    adam: bool = False,
    plain: bool = False,
    loss_fn: nn.Module | None = None,
    give_loader: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """Train with a prepared model, optimizer (LambdaLR-scheduled), and loader; the agent is an
    ``AccelerateAgent`` stepped every micro-batch, or (``plain``) an ``Agent`` on the prepared
    model and optimizer stepped as the README's loop does (every micro-batch too)."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, gradient_accumulation_steps=k, mixed_precision=precision)
    x, y = _data()
    model = _model()
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(model.parameters(), lr=0.01)
        if adam
        else torch.optim.SGD(model.parameters(), lr=0.1, momentum=MOMENTUM)
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    loader = torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=micro)
    pm, popt, ploader, psched = acc.prepare(model, opt, loader, sched)
    used: list[float] = []  # the lr of each real optimizer step
    opt.register_step_pre_hook(lambda o, a, kw: used.append(o.param_groups[0]["lr"]))
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    probe = (x[:24], y[:24])
    rec = tmp_path / "run.stiff"
    if plain:
        agent: Any = offline_agent(pm, loss_fn, popt, rec, probe=probe, **EXACT)
    else:
        given = ploader if give_loader else None
        agent = AccelerateAgent(
            acc, pm, loss_fn, popt, loader=given, endpoint="", record=rec, registry=False,
            probe=probe, **(EXACT | extra),
        )  # fmt: skip
    losses: list[float] = []
    for _ in range(epochs):
        for xb, yb in ploader:
            with acc.accumulate(pm):
                out = pm(xb)
                loss = loss_fn(out, yb)
                acc.backward(loss)
                popt.step()
                psched.step()
                popt.zero_grad()
                losses.append(float(loss.detach()))
                agent.step(loss, out, yb)
    agent.close()
    msgs = read_session(rec)[0]
    return {"msgs": msgs, "cols": _columns(rec), "used": used, "losses": losses,
            "model": model, "probe": probe}  # fmt: skip


def test_prepared_optimizer_threshold_and_name(tmp_path: Path) -> None:
    """The prepared ``AcceleratedOptimizer``: the threshold is SGD's 2(1 + μ)/η at the lr of
    the last step (it was NaN: "no stability rule known for AcceleratedOptimizer"), λ1_H the
    dense Hessian's, the lr column the lr each step used, and the run is named for SGD."""
    r = _loop(tmp_path)
    msgs, used = r["msgs"], r["used"]
    assert len(used) == 8
    np.testing.assert_allclose(r["cols"]["lr/0"], used, rtol=1e-12)
    thr = last_scalar(msgs, "sharpness/threshold")
    assert thr == pytest.approx(2 * (1 + MOMENTUM) / used[-1], rel=1e-12)
    lam = last_scalar(msgs, "sharpness/lambda1_h")
    assert lam == pytest.approx(_ref_lambda1(r["model"], *r["probe"]), rel=1e-5)
    hello = next(m for m in msgs if isinstance(m, p.Hello))
    assert hello.name == "SGD lr=0.1" and hello.optimizer["type"] == "SGD"
    assert not events(msgs, "threshold-none")


def test_prepared_adam_gets_preconditioned_sharpness(tmp_path: Path) -> None:
    """A prepared Adam: λ1(P⁻¹H) is measured (it was not, silently: the type check saw
    AcceleratedOptimizer)."""
    r = _loop(tmp_path, adam=True, epochs=4)  # λ1(P⁻¹H) from Adam's ~10th step on
    assert np.isfinite(last_scalar(r["msgs"], "sharpness/lambda1_precond"))


def test_accumulation_steps_are_optimizer_steps(tmp_path: Path) -> None:
    """k = 4 micro-batches of 8 per optimizer step, ``step()`` every micro-batch: one row per
    optimizer step, B = 32 (it was 8: η/B 4 × too large), the step's mean loss, the lr it used,
    and the last measurement on the final weights."""
    k, micro = 4, 8
    r = _loop(tmp_path, k=k, micro=micro, epochs=2)
    cols, used, losses = r["cols"], r["used"], r["losses"]
    assert len(losses) == 16 and len(used) == 4
    assert len(cols["loss"]) == 4
    hello = next(m for m in r["msgs"] if isinstance(m, p.Hello))
    assert hello.batch_size == k * micro  # B for η/B (a given B: in the hello, no column)
    assert "batch_size" not in cols
    np.testing.assert_allclose(cols["loss"], np.reshape(losses, (4, k)).mean(1), rtol=1e-6)
    np.testing.assert_allclose(cols["lr/0"], used, rtol=1e-12)
    msgs = r["msgs"]
    sharp = [m.step for m in msgs if isinstance(m, p.Scalars) and "sharpness/lambda1_h" in m.names]
    assert sharp == [0, 1, 2, 3]
    assert last_scalar(msgs, "sharpness/threshold") == pytest.approx(
        2 * (1 + MOMENTUM) / used[-1], rel=1e-12
    )
    lam = last_scalar(msgs, "sharpness/lambda1_h")
    assert lam == pytest.approx(_ref_lambda1(r["model"], *r["probe"]), rel=1e-5)


def test_accumulation_b_from_the_logits_without_loader(tmp_path: Path) -> None:
    """Without ``loader=``: B is read from the step's micro-batches' logits, joined (k × m)."""
    r = _loop(tmp_path, k=4, micro=8, epochs=1, give_loader=False)
    np.testing.assert_allclose(r["cols"]["batch_size"], [32, 32])
    np.testing.assert_allclose(r["cols"]["lr/0"], r["used"], rtol=1e-12)


def test_resumed_run_continues_the_step_count(tmp_path: Path) -> None:
    """``start_step=N`` (a run resumed with ``accelerator.load_state``): steps N, N + 1, …"""
    r = _loop(tmp_path, k=2, micro=16, epochs=1, start_step=10)
    steps = [m.step for m in r["msgs"] if isinstance(m, p.Scalars) and "noise/trace_k" in m.names]
    assert steps == [10, 11]
    hello = next(m for m in r["msgs"] if isinstance(m, p.Hello))
    assert hello.name.endswith("(resumed at step 10)")


def test_sum_loss_with_accumulation_is_micro_batch_sum(tmp_path: Path) -> None:
    """A sum-reduced loss, ``accelerator.backward`` dividing by k: the objective adds up one
    micro-batch (m × the mean), so λ1_H is m × the mean loss's."""
    r = _loop(tmp_path, k=4, micro=8, epochs=1, loss_fn=nn.CrossEntropyLoss(reduction="sum"))
    lam = last_scalar(r["msgs"], "sharpness/lambda1_h")
    assert lam == pytest.approx(_ref_lambda1(r["model"], *r["probe"], scale=8.0), rel=1e-5)


def test_bf16_measures_in_the_weights_dtype(tmp_path: Path) -> None:
    """``mixed_precision="bf16"``: λ1_H and the Gram's noise trace are the float64 references'
    to float32 rounding (through accelerate's autocast wrapper: 1.5e-3 and 5e-4 off), and no
    false ``gram-fallback`` warning ("the model couples examples")."""
    r = _loop(tmp_path, precision="bf16")
    msgs, model, probe = r["msgs"], r["model"], r["probe"]
    assert last_scalar(msgs, "sharpness/lambda1_h") == pytest.approx(
        _ref_lambda1(model, *probe), rel=1e-5
    )
    assert last_scalar(msgs, "noise/trace_k") == pytest.approx(
        _ref_trace_k(model, *probe), rel=1e-5
    )
    assert not events(msgs, "gram-fallback")
    assert "_original_forward" in model.__dict__  # the training still runs in bf16


def test_other_processes_do_nothing_and_distributed_is_refused(tmp_path: Path) -> None:
    class NotMain:
        is_main_process = False
        sync_gradients = True

    agent = AccelerateAgent(NotMain(), _model(), nn.CrossEntropyLoss(), None)
    agent.step(1.0)
    agent.close()
    assert agent.agent is None
    with pytest.raises(ValueError, match="main process only"):
        AccelerateAgent(NotMain(), _model(), nn.CrossEntropyLoss(), None, distributed=True)


def test_plain_agent_with_prepared_optimizer_has_a_threshold(tmp_path: Path) -> None:
    r = _loop(tmp_path, plain=True)
    assert np.isfinite(last_scalar(r["msgs"], "sharpness/threshold"))


def test_plain_agent_bf16_measures_in_the_weights_dtype(tmp_path: Path) -> None:
    r = _loop(tmp_path, precision="bf16", plain=True)
    assert last_scalar(r["msgs"], "sharpness/lambda1_h") == pytest.approx(
        _ref_lambda1(r["model"], *r["probe"]), rel=1e-5
    )
    assert not events(r["msgs"], "gram-fallback")
