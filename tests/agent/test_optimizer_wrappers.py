"""Optimizer wrappers and loops with several optimizers: SAM stepped the usual way
(``first_step()`` / ``second_step()``, its own ``step()`` never called) is read at its base
optimizer's steps, a wrapper whose steps the agent cannot see is said once, and the messages of a
GAN's two agents say which run they are about and do not tell the user anything wrong."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from stiffmon import protocol as p
from stiffmon.session import read_session
from stiffmon_agent import Agent
from stiffmon_agent.optimizer_read import wrapped_optimizer
from stiffmon_agent.optimizer_skips import OptimizerSkips
from stiffmon_agent.step_scalars import UNSEEN_CODE, OptimizerColumns


class SAM(torch.optim.Optimizer):
    """The usual SAM implementation (Foret et al.; the widely copied one): the base optimizer
    shares its param groups and does the update in ``second_step()``."""

    def __init__(self, params: Any, base_optimizer: type, rho: float = 0.05, **kwargs: Any):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        norm = torch.norm(
            torch.stack([q.grad.norm() for g in self.param_groups for q in g["params"]])
        )
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for q in group["params"]:
                if q.grad is None:
                    continue
                self.state[q]["old_p"] = q.data.clone()
                q.add_(q.grad * scale)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for q in group["params"]:
                if q.grad is not None:
                    q.data = self.state[q]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        assert closure is not None, "SAM's step needs a closure"
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        closure()
        self.second_step()


def _sam_run(tmp_path: Path, steps: int, with_closure: bool) -> tuple[list[Any], list[float]]:
    """A SAM loop with a LambdaLR stepped before ``agent.step()``: the session's messages and
    the lr each base-optimizer step used."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    # on the base optimizer (the groups are the same): torch warns of one never stepped
    sched = torch.optim.lr_scheduler.LambdaLR(opt.base_optimizer, lambda s: 1.0 / (1 + s))
    used: list[float] = []
    opt.base_optimizer.register_step_pre_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"]))
    rec = tmp_path / "sam.stiff"
    agent = Agent(model, nn.CrossEntropyLoss(), opt, endpoint="", record=rec, registry=False)
    x, y = torch.randn(16, 6), torch.arange(16) % 3
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if with_closure:
            opt.step(lambda: nn.functional.cross_entropy(model(x), y).backward())
        else:
            opt.first_step(zero_grad=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        sched.step()  # before agent.step(): the README allows either order
        agent.step(loss)
    agent.close()
    return read_session(rec)[0], used


@pytest.mark.parametrize("with_closure", [False, True])
def test_sam_rows_carry_the_lr_each_update_used(tmp_path: Path, with_closure: bool) -> None:
    """Without a closure SAM's own ``step()`` never runs: the base optimizer's steps are read
    (the lr was one step ahead); with one, its step is read once per step (not twice). Past
    the 64 calls after which a hook that sees nothing is taken as blind: no warning, no skip."""
    msgs, used = _sam_run(tmp_path, steps=80, with_closure=with_closure)
    got = np.concatenate([m.column("lr/0") for m in msgs if isinstance(m, p.Columns)])
    assert len(used) == 80
    np.testing.assert_allclose(got, used, rtol=1e-12)
    codes = {m.code for m in msgs if isinstance(m, p.Event)}
    assert not codes & {UNSEEN_CODE, "optimizer-step-skipped", "step-order"}


def test_the_wrapped_hook_goes_once_the_wrappers_own_step_is_seen() -> None:
    model = nn.Linear(3, 2)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    assert wrapped_optimizer(opt) is opt.base_optimizer
    assert wrapped_optimizer(torch.optim.SGD(model.parameters(), lr=0.1)) is None
    cols = OptimizerColumns(opt)
    cols.attach()
    assert cols._inner_hook is not None
    x = torch.randn(4, 3)
    model(x).sum().backward()
    opt.step(lambda: model(x).sum().backward())
    assert cols._inner_hook is None and cols._steps_since == 1
    cols.remove_hook()


class Hidden(torch.optim.Optimizer):
    """A wrapper that keeps its base optimizer where the agent does not look (a list), and
    whose own ``step()`` the loop never calls."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, {"lr": lr})
        self.inner = [torch.optim.SGD(self.param_groups, lr=lr)]
        self.param_groups = self.inner[0].param_groups

    def step(self, closure: Any = None) -> None:  # never called here
        self.inner[0].step()


def test_a_step_never_seen_is_said_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Linear(3, 2)
    opt = Hidden(model.parameters(), lr=0.1)
    rec = tmp_path / "hidden.stiff"
    with caplog.at_level(logging.WARNING, logger="stiffmon_agent"):
        agent = Agent(model, nn.MSELoss(), opt, endpoint="", record=rec, registry=False, run="hid")
        x = torch.randn(4, 3)
        for _ in range(200):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.inner[0].step()
            agent.step(0.5)
        agent.close()
    said = [m for m in read_session(rec)[0] if isinstance(m, p.Event) and m.code == UNSEEN_CODE]
    assert len(said) == 1 and said[0].level == "warning"
    assert "no Hidden.step() seen" in said[0].message
    assert "read at agent.step()" in said[0].message
    assert "pass Agent(optimizer=...) the optimizer whose step() runs" in said[0].message
    lines = [r.getMessage() for r in caplog.records if "Hidden.step()" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("stiffmon [hid]: no Hidden.step() seen")


class GAN(nn.Module):
    """One module holding both players."""

    def __init__(self) -> None:
        super().__init__()
        self.G = nn.Linear(4, 6)
        self.D = nn.Linear(6, 1)


class _Lines(logging.Handler):
    """Keeps the agent's console lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Any], list[Any], list[str]]:
    """A GAN whose discriminator makes two backward passes per step (real, fake), with an
    agent per player on the one module: each agent's messages, and the console lines."""
    tmp_path = tmp_path_factory.mktemp("gan")
    torch.manual_seed(0)
    gan = GAN()
    opt_d = torch.optim.SGD(gan.D.parameters(), lr=2e-4)
    opt_g = torch.optim.SGD(gan.G.parameters(), lr=1e-3)
    bce = nn.BCEWithLogitsLoss()
    common: dict[str, Any] = {
        "endpoint": "",
        "registry": False,
        "gram_every": "never",
        "sharpness_every": "never",
        "density_every": "never",
    }
    probe_d = (torch.randn(8, 6), (torch.arange(8) % 2).float())
    probe_g = (torch.randn(8, 4), torch.ones(8))
    logger = logging.getLogger("stiffmon_agent")
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        agent_d = Agent(
            gan, bce, opt_d, probe=probe_d, forward=lambda m, x: m.D(x).squeeze(-1),
            record=tmp_path / "d.stiff", run="D lr=2e-4", **common,
        )  # fmt: skip
        agent_g = Agent(
            gan, bce, opt_g, probe=probe_g, forward=lambda m, z: m.D(m.G(z)).squeeze(-1),
            record=tmp_path / "g.stiff", run="G lr=1e-3", **common,
        )  # fmt: skip
        for _ in range(14):
            real, z = torch.randn(16, 6), torch.randn(16, 4)
            ones, zeros = torch.ones(16), torch.zeros(16)
            opt_d.zero_grad()
            d_real = gan.D(real).squeeze(-1)
            loss_real = bce(d_real, ones)
            loss_real.backward()
            loss_fake = bce(gan.D(gan.G(z).detach()).squeeze(-1), zeros)
            loss_fake.backward()
            opt_d.step()
            agent_d.step(loss_real + loss_fake, d_real, ones)
            opt_g.zero_grad()
            d_gen = gan.D(gan.G(z)).squeeze(-1)
            loss_g = bce(d_gen, ones)
            loss_g.backward()
            opt_g.step()
            agent_g.step(loss_g, d_gen, ones)
        agent_d.close()
        agent_g.close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    msgs_d, msgs_g = (read_session(tmp_path / f"{w}.stiff")[0] for w in "dg")
    return msgs_d, msgs_g, handler.lines


def test_extra_backward_passes_are_not_said_to_be_accumulation(
    gan_run: tuple[list[Any], list[Any], list[str]],
) -> None:
    """The discriminator's extra backward passes: "if accumulation, pass ...; a GAN's are not"
    (the fix it proposed would make η/B wrong), with the event's code and attrs as before, on
    the console under the run's name."""
    msgs_d, _, lines = gan_run
    acc = [m for m in msgs_d if isinstance(m, p.Event) and m.code == "batch-size-accumulation"]
    assert len(acc) == 1 and acc[0].level == "warning"
    k = acc[0].attrs["backwards"]
    assert k >= 2 and acc[0].attrs == {"backwards": k, "batch_size": 16}
    text = acc[0].message
    assert "If this is gradient accumulation" in text and f"{k} × 16 = {16 * k}" in text
    assert "GAN" in text and "not accumulation" in text and "B is right" in text
    assert "(gradient accumulation?)" not in text
    assert [line for line in lines if "backward passes" in line] == [
        f"stiffmon [D lr=2e-4]: {text}"
    ]


def test_the_other_players_parameters_are_left_out_without_freeze_advice(
    gan_run: tuple[list[Any], list[Any], list[str]],
) -> None:
    """They are trained by the other optimizer: not "never move (freeze them)"."""
    msgs_d, msgs_g, lines = gan_run
    for msgs, name in ((msgs_d, "D lr=2e-4"), (msgs_g, "G lr=1e-3")):
        note = [m for m in msgs if isinstance(m, p.Event) and m.code == "params-not-optimized"]
        assert len(note) == 1
        text = note[0].message
        assert "2 of the model's 4" in text and "another optimizer may train them" in text
        assert "never move" not in text and "freeze them to say so" not in text
        assert f"stiffmon [{name}]: {text}" in lines


def test_param_count_is_the_measured_count(
    gan_run: tuple[list[Any], list[Any], list[str]],
) -> None:
    """The optimizer-held trainable count (what is measured); the whole module's in meta."""
    msgs_d, msgs_g, _ = gan_run
    hello_d = next(m for m in msgs_d if isinstance(m, p.Hello))
    hello_g = next(m for m in msgs_g if isinstance(m, p.Hello))
    assert (hello_d.param_count, hello_g.param_count) == (6 + 1, 4 * 6 + 6)
    assert hello_d.meta["model_param_count"] == hello_g.meta["model_param_count"] == 37


def test_one_optimizer_for_the_whole_model_keeps_param_count_and_meta(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    rec = tmp_path / "plain.stiff"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    Agent(model, nn.MSELoss(), opt, endpoint="", record=rec, registry=False).close()
    hello = next(m for m in read_session(rec)[0] if isinstance(m, p.Hello))
    assert hello.param_count == 8 and "model_param_count" not in hello.meta


def test_skip_and_budget_lines_name_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = Agent(model, nn.MSELoss(), opt, endpoint="", registry=False, run="r1")
    assert agent._budget.who == agent._skips.who == "stiffmon [r1]"
    agent.close()
    skips = OptimizerSkips(lambda *a, **k: None, lambda *a, **k: None)
    skips.who = "stiffmon [r1]"
    with caplog.at_level(logging.INFO, logger="stiffmon_agent"):
        skips.note(3, 100.0)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith("stiffmon [r1]: no optimizer step at step 3")
