"""Sharded measurement under torch.distributed: 2 gloo processes (torchrun) against one process.

The 2-process runs use ``tests/agent/sharded_script.py`` under ``torchrun --nproc_per_node 2``
(each in its own process group, killed as a group at teardown, with timeouts).
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from stiffmon import protocol as p
from stiffmon.session import read_session
from stiffmon.transport import free_port_pair
from stiffmon_agent import Agent, block_exchange
from stiffmon_agent.block_exchange import Task, owner, tasks
from stiffmon_agent.distributed import bounds, sharded_parameters, unwrap
from tests.agent.torchrun import ENV
from tests.agent.torchrun import kill_tree as _kill_tree
from tests.conftest import GLOO_TEARDOWN, ROOT

SCRIPT = ROOT / "tests" / "agent" / "sharded_script.py"


class Group:
    """Subprocesses in their own sessions: the whole process group is killed at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def torchrun(self, *args: str, world: int = 2) -> subprocess.Popen[str]:
        # --standalone: the rendezvous binds a free port itself, no port picked and released here
        return self.start(
            "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), *args
        )


@pytest.fixture
def group() -> Iterator[Group]:
    g = Group()
    yield g
    for proc in g.procs:
        _kill_tree(proc.pid)  # with a hung worker, the launcher is still waiting for it
        proc.communicate(timeout=10)


def finish(proc: subprocess.Popen[str], timeout: float = 150, ranks: int = 0) -> str:
    """Wait for ``proc``; it must succeed.

    With ``ranks``, one known failure is tolerated: gloo aborting a rank in
    ``destroy_process_group`` after every rank printed ``rank r done`` (under load, rarely, even
    after a barrier: one rank tears its connections down while the other is still leaving the
    barrier). All the work is done and checked by then; anything else fails the test.
    """
    out, err = proc.communicate(timeout=timeout)
    done = all(f"rank {r} done" in out for r in range(ranks)) if ranks else False
    if proc.returncode != 0 and done and GLOO_TEARDOWN in err:
        return out
    assert proc.returncode == 0, err[-3000:]
    return out


def heavy(path: Path) -> dict[tuple[str, str, int], np.ndarray]:
    """Every measured number of a session, keyed by (kind, name, step)."""
    out: dict[tuple[str, str, int], np.ndarray] = {}
    for m in read_session(path)[0]:
        if isinstance(m, p.Matrix):
            out[("matrix", m.name, m.step)] = np.asarray(m.data, dtype=float).ravel()
        elif isinstance(m, p.Spectrum):
            out[("spectrum", m.name, m.step)] = np.asarray(m.values, dtype=float)
        elif isinstance(m, p.Curve):
            out[("curve", m.name, m.step)] = np.concatenate(
                [np.asarray(m.x, dtype=float), np.asarray(m.y, dtype=float)]
            )
        elif isinstance(m, p.Scalars):
            for k, v in m.as_dict().items():
                out[("scalar", k, m.step)] = np.asarray([v], dtype=float)
        elif isinstance(m, p.Event):
            out[("event", m.code, m.step)] = np.zeros(1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("world", "model"), [(2, "cnn"), (3, "cnn"), (2, "tokens")])
def test_sharded_processes_measure_what_one_process_measures(
    group: Group, tmp_path: Path, world: int, model: str
) -> None:
    """With 3 ranks each pair of shards is split between its ranks and rank 0 assembles blocks
    of unequal shapes from two others (the 20 Gram examples split 6/7/7, the 13 train ones
    4/4/5). The token model sends ghost factors of several positions and an embedding's rows."""
    sharded, ref = tmp_path / "sharded.stiff", tmp_path / "ref.stiff"
    runs = [
        group.torchrun(str(SCRIPT), str(sharded), "sharded", model, world=world),
        group.start(str(SCRIPT), str(ref), "reference", model),
    ]
    outs = [finish(proc, ranks=r) for proc, r in zip(runs, (world, 1), strict=True)]
    assert all(f"rank {r} done, disabled: []" in outs[0] for r in range(world))
    got, want = heavy(sharded), heavy(ref)
    assert set(got) == set(want)
    names = {k[1] for k in want}
    common = (
        "stiffness/cos/train-train",
        "stiffness/cos/train-val",
        "stiffness/sign/val-val",
        "grad-cov",
        "noise/b_simple",
        "hessian",
        "hessian-precond",
        "hessian-density",
        "curvature/trace",
        "sharpness/lambda1_precond",
    )
    specific = {
        "cnn": ("layer-stiffness/5", "stiffness-distance/3"),  # 5: a raw parameter, exact path
        "tokens": ("layer-stiffness/emb", "layer-stiffness/proj", "stiffness-distance/mix"),
    }
    for needed in (*common, *specific[model]):
        assert needed in names, needed
    for key, w in want.items():
        g = got[key]
        assert g.shape == w.shape, key
        assert np.array_equal(np.isnan(g), np.isnan(w)), key
        ok = ~np.isnan(w)
        if ok.any():
            scale = max(float(np.abs(w[ok]).max()), 1e-300)
            assert float(np.abs(g[ok] - w[ok]).max()) <= 1e-6 * scale, key
    lam = [v for k, v in want.items() if k[:2] == ("scalar", "sharpness/lambda1_h")]
    assert len(lam) == 3 and all(math.isfinite(float(v[0])) for v in lam)


def test_a_rank_failing_leaves_nobody_waiting(group: Group, tmp_path: Path) -> None:
    rec = tmp_path / "fail.stiff"
    out = finish(group.torchrun(str(SCRIPT), str(rec), "fail"), ranks=2)
    assert "rank 0 done, disabled: ['density', 'gram', 'sharpness']" in out
    events = [m for m in read_session(rec)[0] if isinstance(m, p.Event)]
    skipped = [(e.step, e.attrs.get("metric")) for e in events if e.code == "measurement-skipped"]
    assert skipped[:3] == [(0, "gram"), (0, "sharpness"), (0, "density")]  # NaN on rank 1 only
    assert any("not finite" in e.message for e in events if e.step == 0)
    errors = {e.attrs["metric"]: e.message for e in events if e.code == "metric-error"}
    assert set(errors) == {"gram", "sharpness", "density"}
    assert all("1 other rank" in msg for msg in errors.values())
    assert all(e.step == 1 for e in events if e.code == "metric-error")


def test_a_rank_that_cannot_send_its_rows_leaves_nobody_waiting(
    group: Group, tmp_path: Path
) -> None:
    rec = tmp_path / "fail-rows.stiff"
    out = finish(group.torchrun(str(SCRIPT), str(rec), "fail-rows"), ranks=2)
    assert "rank 0 done, disabled: ['gram']" in out and "rank 1 done" in out
    events = [m for m in read_session(rec)[0] if isinstance(m, p.Event)]
    errors = [e for e in events if e.code == "metric-error"]
    assert [(e.step, e.attrs["metric"]) for e in errors] == [(0, "gram")]
    assert "the Gram blocks failed on 1 other rank" in errors[0].message
    msgs = read_session(rec)[0]
    assert any(isinstance(m, p.Spectrum) for m in msgs)  # the Hessian measurements go on


def test_an_in_batch_contrastive_loss_is_refused_on_every_rank_with_the_reason(
    group: Group, tmp_path: Path
) -> None:
    """Each rank checks its own examples' gradients (before, the sharded Gram of InfoNCE was
    published as all zeros); the refusal is agreed, so nobody waits for Gram rows."""
    rec = tmp_path / "infonce.stiff"
    out = finish(group.torchrun(str(SCRIPT), str(rec), "infonce"), ranks=2)
    assert "rank 0 done, disabled: ['gram']" in out and "rank 1 done" in out
    msgs = read_session(rec)[0]
    errors = [m for m in msgs if isinstance(m, p.Event) and m.code == "metric-error"]
    assert [(e.step, e.attrs["metric"]) for e in errors] == [(0, "gram")]
    assert "own has no gradient" in errors[0].message
    assert not any(isinstance(m, p.Matrix) and m.name.endswith("train-train") for m in msgs)
    assert any(isinstance(m, p.Spectrum) for m in msgs)


def test_step_on_rank_0_only_stops_sharding_after_the_timeout_and_rank_0_measures_alone(
    group: Group, tmp_path: Path
) -> None:
    rec = tmp_path / "rank0-step.stiff"
    out = finish(group.torchrun(str(SCRIPT), str(rec), "rank0-step"), ranks=2)
    assert "rank 0 done, disabled: []" in out and "rank 1 done" in out
    msgs = read_session(rec)[0]
    off = [m for m in msgs if isinstance(m, p.Event) and m.code == "sharding-off"]
    assert len(off) == 1 and off[0].step == 0 and off[0].level == "warning"
    assert "within 4 s (rank_timeout)" in off[0].message
    assert "step() must be called on every rank" in off[0].message
    grams = [m.step for m in msgs if isinstance(m, p.Matrix) and m.name.endswith("train-train")]
    assert sorted(grams) == [0, 0, 1, 1, 2, 2]  # cos and sign: measured alone from step 0


def test_an_agent_made_on_rank_0_only_is_refused_after_the_timeout_naming_the_rank(
    group: Group, tmp_path: Path
) -> None:
    rec = tmp_path / "rank0-agent.stiff"
    out = finish(group.torchrun(str(SCRIPT), str(rec), "rank0-agent"), ranks=2)
    assert "rank 1 done, no agent" in out
    refused = "rank 0 done, refused: Agent(distributed=True): no agent from rank(s) 1 within 4 s"
    assert refused in out


_FSDP = textwrap.dedent(
    """
    import sys
    import torch, torch.distributed as dist
    from torch import nn
    from stiffmon_agent import Agent
    from stiffmon_agent.distributed import sharded_parameters
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor, Replicate

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=0,
                            world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    fsdp1 = FullyShardedDataParallel(nn.Linear(4, 3), device_id=torch.device("cpu"))
    fsdp2 = nn.Sequential(nn.Linear(4, 3))
    fully_shard(fsdp2, mesh=mesh)
    raw = nn.Linear(4, 3)  # DTensor parameters without FSDP
    raw.weight = nn.Parameter(distribute_tensor(raw.weight.detach(), mesh, [Replicate()]))
    probe = (torch.randn(4, 4), torch.tensor([0, 1, 2, 0]))
    for model in (fsdp1, fsdp2, raw):
        try:
            Agent(model, nn.CrossEntropyLoss(), probe=probe, endpoint="", registry=False)
        except ValueError as exc:
            print("refused:", exc)
    Agent(fsdp2, nn.CrossEntropyLoss(), endpoint="", registry=False).close()  # no probe: fine
    print("scalars only: ok")
    dist.destroy_process_group()
    """
)


def test_sharded_parameters_are_refused_at_construction(group: Group, tmp_path: Path) -> None:
    script = tmp_path / "fsdp.py"
    script.write_text(_FSDP)
    out = finish(group.start(str(script), str(free_port_pair())), timeout=120)
    refused = [line for line in out.splitlines() if line.startswith("refused:")]
    assert len(refused) == 3, out
    assert "FullyShardedDataParallel" in refused[0] and "FSDP" in refused[1]
    assert "DTensor" in refused[2] and "scalars only: ok" in out


@pytest.mark.parametrize("world", range(2, 10))
def test_every_entry_of_the_gram_matrix_is_computed_once_and_the_work_is_shared(
    world: int,
) -> None:
    for n in (world - 1, world, 7 * world + 3, 101 * world):
        counts = [b - a for a, b in (bounds(n, r, world) for r in range(world))]
        starts = list(itertools.accumulate([0, *counts]))
        hits = torch.zeros(n, n, dtype=torch.int64)
        products = []
        for r in range(world):
            plan = tasks(r, counts)
            assert plan[0] == Task(0, counts[r], r, 0, counts[r])  # the diagonal block first
            for t in plan[1:]:
                assert block_exchange.needed(r, t.other, counts) == (t.other_lo, t.other_hi)
                rows = slice(starts[r] + t.lo, starts[r] + t.hi)
                cols = slice(starts[t.other] + t.other_lo, starts[t.other] + t.other_hi)
                hits[rows, cols] += 1
                hits[cols, rows] += 1
            d = slice(starts[r], starts[r + 1])
            hits[d, d] += 1
            products.append(sum(t.size for t in plan))
        assert bool((hits == 1).all())  # each entry once, off-diagonal ones as a transpose
        if n >= 100 * world:  # the products are shared evenly (up to a row per shard)
            assert max(products) / min(products) < 1.05
    for i, j in itertools.combinations(range(world), 2):
        assert owner(i, j) == owner(j, i) in (i, j)


def test_bounds_split_every_example_once() -> None:
    for n in (1, 2, 7, 13, 100):
        for world in (1, 2, 3, 8):
            parts = [bounds(n, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
            sizes = [b - a for a, b in parts]
            assert max(sizes) - min(sizes) <= 1


def test_unwrap_and_plain_models() -> None:
    inner = nn.Linear(2, 2)
    assert unwrap(nn.DataParallel(inner)) is inner and unwrap(inner) is inner
    assert sharded_parameters(nn.Sequential(inner, nn.ReLU())) is None


def test_distributed_without_a_process_group_is_one_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(12, 4), torch.arange(12) % 3
    rec = tmp_path / "one.stiff"
    kwargs: dict[str, Any] = {"endpoint": "", "record": rec, "overhead_cap": None}
    agent = Agent(model, nn.CrossEntropyLoss(), opt, probe=(x, y), distributed=True, **kwargs)
    assert agent.shard is None
    agent.step(torch.tensor(1.0))
    agent.close()
    assert any(isinstance(m, p.Matrix) for m in read_session(rec)[0]) and not agent.disabled


_DDP_BATCH = textwrap.dedent(
    """
    import os, sys
    import torch, torch.distributed as dist
    from torch import nn
    from stiffmon.session import read_session
    from stiffmon_agent import Agent

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    rec = sys.argv[1] if rank == 0 else None
    agent = Agent(model, loss_fn, opt, probe=(x, y), endpoint="", record=rec, registry=False,
                  gram_every="never", sharpness_every=1, overhead_cap=None)
    for _ in range(2):
        out = model(x[:5])
        loss = loss_fn(out, y[:5])
        opt.zero_grad(); loss.backward(); opt.step()
        agent.step(loss, out, y[:5])
    if rank == 0:  # to a file: the ranks' stdout lines may interleave mid-line
        with open(sys.argv[1] + ".txt", "w") as f:
            f.write(f"B {agent._sharp_state.batch_size} sum_over {agent._sharp_state.sum_over}")
    agent.close()
    print(f"rank {rank} done", flush=True)
    dist.destroy_process_group()
    """
)


def test_under_ddp_b_read_from_the_logits_is_the_global_batch(group: Group, tmp_path: Path) -> None:
    """DDP averages the ranks' gradients: B = W × one rank's batch (η/B), and a sum-reduced
    objective adds up one rank's batch."""
    script, rec = tmp_path / "ddp_batch.py", tmp_path / "ddp.stiff"
    script.write_text(_DDP_BATCH)
    finish(group.torchrun(str(script), str(rec)), timeout=150, ranks=2)
    said = Path(f"{rec}.txt").read_text()
    assert said == "B 10 sum_over 5", said
    rows = p.expand_columns(read_session(rec)[0])
    b = [m.as_dict()["batch_size"] for m in rows if m.kind == "scalars" and "batch_size" in m.names]
    assert b and set(b) == {10.0}, b
