"""Training steps without an optimizer step (``GradScaler`` skipping inf/NaN gradients): told
apart from ``agent.step()`` called before ``optimizer.step()``, counted, and on the screen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stiffmon import protocol as p
from stiffmon.derive import OPTIMIZER_SKIPPED
from stiffmon.session import read_session
from stiffmon.store import Store
from stiffmon.tui.chrome import coverage_lines
from stiffmon_agent import Agent
from stiffmon_agent.optimizer_skips import OptimizerSkips
from stiffmon_agent.step_scalars import OptimizerColumns


def _loop() -> tuple[
    nn.Module, torch.optim.Optimizer, OptimizerColumns, torch.Tensor, torch.Tensor
]:
    """A tiny model, its SGD, the columns watching it, and a batch."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cols = OptimizerColumns(opt)
    cols.attach()
    return model, opt, cols, torch.randn(8, 4), torch.randint(0, 3, (8,))


def _found(order: str, skips: set[int], steps: int = 9, zero_after: bool = False) -> tuple:
    """(steps found skipped, read_now) for a loop in ``order`` whose optimizer steps at
    ``skips`` do not happen; ``zero_after``: ``zero_grad()`` right after ``optimizer.step()``."""
    model, opt, cols, x, y = _loop()
    found = []
    for s in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if order == "agent-first":
            cols.values()
            found += [s - back for back in cols.skipped_back]
        if s not in skips:
            opt.step()
            if zero_after:
                opt.zero_grad()
        if order == "usual":
            cols.values()
            found += [s - back for back in cols.skipped_back]
    cols.remove_hook()
    return sorted(found), cols.read_now


@pytest.mark.parametrize("zero_after", [False, True])
@pytest.mark.parametrize(
    "skips", [set(), {0}, {0, 1}, {0, 4}, {2, 5}, {1, 2, 3}, {8}, {0, 1, 2, 3, 4}]
)
def test_skipped_optimizer_steps_are_found_in_the_usual_order(
    skips: set[int], zero_after: bool
) -> None:
    """A first step skipped looked like ``agent.step()`` before ``optimizer.step()`` (same hook
    counts): the agent then read every row's lr at ``agent.step()`` and warned wrongly. No
    backward since the optimizer step tells the usual order."""
    assert _found("usual", skips, zero_after=zero_after) == (sorted(skips), False)


@pytest.mark.parametrize("skips", [set(), {4}, {6}, {4, 5}])
def test_agent_first_is_still_noticed_and_its_skips_are_found_a_step_late(
    skips: set[int],
) -> None:
    """With ``agent.step()`` first, a skipped step shows at the next call (the step before)."""
    assert _found("agent-first", skips) == (sorted(skips), True)


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_a_gradscaler_run_records_its_skips_right_lrs_and_no_false_order_warning(
    tmp_path: Path,
) -> None:
    """A real ``GradScaler`` (inf put into a gradient at steps 0, 3 and 4), ``scheduler.step()``
    before ``agent.step()``. Before: the skipped first step made the agent warn that
    ``agent.step()`` came first and read every later row's lr as the next step's."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    rec = tmp_path / "amp.stiff"
    agent = Agent(model, nn.CrossEntropyLoss(), opt, endpoint="", record=rec, registry=False)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    used, skipped = [], []
    for s in range(8):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if s in (0, 3, 4):
            model.bias.grad[0] = float("inf")  # type: ignore[index]
        used.append(opt.param_groups[0]["lr"])
        before = model.weight.detach().clone()
        scaler.step(opt)
        scaler.update()
        if torch.equal(before, model.weight):
            skipped.append(s)
        sched.step()
        agent.step(loss)
    agent.close()
    assert skipped == [0, 3, 4]
    msgs = read_session(rec)[0]
    lrs = np.concatenate([m.column("lr/0") for m in msgs if isinstance(m, p.Columns)])
    stepped = [s for s in range(8) if s not in skipped]
    np.testing.assert_array_equal(lrs[stepped], np.asarray(used)[stepped])
    events = [m for m in msgs if isinstance(m, p.Event)]
    assert not [m for m in events if m.code == "step-order"]
    said = [m for m in events if m.code == "optimizer-step-skipped"]
    assert [m.attrs["skipped"] for m in said] == [1, 2]  # the 1st and 2nd (then the 5th, ...)
    assert said[0].level == "warning" and "no optimizer step at step 0" in said[0].message
    assert [m.step for m in said] == [0, 3]  # dated at the skipped steps, as their words say
    counts = {
        m.step: m.as_dict()[OPTIMIZER_SKIPPED]
        for m in msgs
        if isinstance(m, p.Scalars) and OPTIMIZER_SKIPPED in m.names
    }
    assert counts[max(counts)] == 3 and set(counts) <= {0, 3, 4}  # the last count sent at close
    store = Store()
    store.extend(msgs, replay=True)
    (rd,) = store.runs.values()
    assert "optimizer skips: 3" in coverage_lines(rd)


def test_the_count_goes_out_at_most_every_interval_and_the_last_one_always() -> None:
    sent: list[tuple[int, float]] = []
    events: list[int] = []
    skips = OptimizerSkips(
        lambda cls, fields, step: sent.append((step, fields["values_raw"][0])),
        lambda code, msg, level, at_step, skipped: events.append(skipped),
    )
    for s in range(30):  # every step skipped, 10 ms apart
        skips.note(s, 100.0 + 0.01 * s)
    assert events == [1, 2, 5, 10, 20]
    assert [c for _, c in sent] == [1, 2, 5, 10, 20]  # said ones, none 0.5 s after another
    skips.tick(100.0 + 0.3)  # too soon
    assert skips.pending == 29 and len(sent) == 5
    skips.tick(100.0 + 0.8)
    assert sent[-1] == (29, 30.0) and skips.pending is None
    skips.send(101.0)  # nothing pending: nothing sent
    assert len(sent) == 6


def test_steps_the_hook_never_sees_are_not_taken_for_skips() -> None:
    """An optimizer wrapper whose steps do not reach the hook (or a loop that never steps it):
    nothing is told, and what is remembered stays bounded."""
    w = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=0.1)
    cols = OptimizerColumns(opt)
    cols.attach()
    for _ in range(1000):
        w.grad = torch.ones(2)
        cols.values()
        assert cols.skipped_back == []
    assert len(cols._quiet) < 64
    for _ in range(4):  # from its first step on, the hook counts (and the cycles are known)
        opt.step()
        cols.values()
    cols.values()
    assert cols.skipped_back == [0]
    cols.remove_hook()


def _accumulating(k: int, skipped_cycles: set[int], cycles: int = 12) -> list[int]:
    """Calls found skipped in a loop calling ``agent.step()`` (here ``values()``) after every
    micro-batch and ``optimizer.step()`` after every ``k``-th, but not in ``skipped_cycles``."""
    model, opt, cols, x, y = _loop()
    found, call = [], 0
    for c in range(cycles):
        for micro in range(k):
            nn.functional.cross_entropy(model(x), y).backward()
            if micro == k - 1:
                if c not in skipped_cycles:
                    opt.step()
                opt.zero_grad()
            cols.values()
            found += [call - back for back in cols.skipped_back]
            call += 1
    cols.remove_hook()
    return sorted(found)


@pytest.mark.parametrize("k", [2, 4])
def test_gradient_accumulation_with_a_step_per_micro_batch_is_not_a_skip(k: int) -> None:
    """The README allows agent.step() per micro-batch: k - 1 calls of every k have no optimizer
    step by design (they were all counted as GradScaler skips, with a warning each)."""
    assert _accumulating(k, set()) == []


def test_a_skipped_step_under_gradient_accumulation_is_found() -> None:
    """A cycle of 8 calls where 4 are usual: the 4 calls past the usual 3 are the skipped ones,
    told once the usual cycle is known (after 4 cycles) or as they come after that."""
    assert _accumulating(4, {1}) == [4, 5, 6, 7]
    assert _accumulating(4, {6}) == [24, 25, 26, 27]
    assert _accumulating(1, {0, 7}, cycles=12) == [0, 7]


def test_an_agent_stepped_per_micro_batch_reports_no_skips(tmp_path: Path) -> None:
    """Gradient accumulation over 4 micro-batches, ``agent.step()`` after each (as the README
    allows), one real GradScaler skip (inf at cycle 6): that one cycle is counted, not the 3
    micro-batches of every cycle."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    rec = tmp_path / "accum.stiff"
    agent = Agent(model, nn.CrossEntropyLoss(), opt, endpoint="", record=rec, registry=False)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for cycle in range(10):
        for micro in range(4):
            loss = nn.functional.cross_entropy(model(x), y) / 4
            scaler.scale(loss).backward()
            if micro == 3:
                if cycle == 6:
                    model.bias.grad[0] = float("inf")  # type: ignore[index]
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
            agent.step(loss)
    agent.close()
    msgs = read_session(rec)[0]
    said = [m for m in msgs if isinstance(m, p.Event) and m.code == "optimizer-step-skipped"]
    assert [m.step for m in said] == [24, 25]  # cycle 6 = calls 24..27: the 1st and 2nd said
    counts = [
        m.as_dict()[OPTIMIZER_SKIPPED]
        for m in msgs
        if isinstance(m, p.Scalars) and OPTIMIZER_SKIPPED in m.names
    ]
    assert counts and max(counts) == 4  # the 4 calls of the skipped cycle
