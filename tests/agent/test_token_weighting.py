"""Padded (B, T) class-index targets of a mean-reduced loss: torch divides by the whole batch's
count, Σ_{i,t} c_it ℓ_it / Σ_{i,t} c_it (c_it: 0 where the target is -100, the class weight or
1), so each example's loss is L_i = Σ_t c_it ℓ_it / c̄, c̄ the train probe's mean count.

Before, L_i was each example's own mean and the probe objective the mean of those means: λ1_H,
Tr K and the noise scale were of another objective. Every figure is checked in float64 against
references of torch's own mean-reduced loss (dense Hessians, a naive per-example loop), on every
per-example gradient path (ghost / materialised hooks, vmap, the loop; embedding, linear,
attention and GRU layers) and on the agent's published numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon.session import read_session
from stiffmon_agent.metrics import hessian_eigen
from stiffmon_agent.metrics.gram import per_example_gram
from stiffmon_agent.metrics.probe import per_example_losses
from stiffmon_agent.probe_set import count_weighted
from tests.agent.metrics.models import TokenLM
from tests.agent.metrics.reference import dense_hessian_of, loop_gradients, rel_err
from tests.agent.recording import close_and_read, events, last_scalar, offline_agent

V, T = 7, 6
LENGTHS = (6, 2, 5, 1, 4, 3, 6, 2)  # padded to T with -100: lengths differ


class AttentionLM(nn.Module):
    """Embedding, causal ``nn.MultiheadAttention``, head (the attention rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, V)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.emb(tokens)
        n = tokens.shape[1]
        mask = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        return self.head(torch.tanh(h + a))


class GruLM(nn.Module):
    """Embedding, GRU, head at every position (the per-example loop: vmap cannot run a GRU)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 3)
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, V)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.rnn(self.emb(tokens))
        return self.head(out)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "tokens": lambda: TokenLM(V),
    "attention": AttentionLM,
    "gru": GruLM,
}


def _data(
    kind: str = "tokens", lengths: tuple[int, ...] = LENGTHS
) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = MODELS[kind]().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (len(lengths), T), generator=g)
    y = torch.randint(0, V, (len(lengths), T), generator=g)
    for i, length in enumerate(lengths):
        y[i, length:] = -100
    return model, x, y


WEIGHT = torch.linspace(0.3, 3.0, V, dtype=torch.float64)


def _transposed(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).transpose(1, 2)  # (B, V, T), as nn.CrossEntropyLoss takes it


def _torch_mean(y: Tensor, weight: Tensor | None) -> Callable[[Tensor], Tensor]:
    """torch's own mean-reduced loss of the batch on (B, T, V) logits: the objective."""
    return lambda out: F.cross_entropy(out.transpose(1, 2), y, weight=weight)


def _count(y: Tensor, weight: Tensor | None) -> Tensor:
    """Σ_{i,t} c_it, counted independently of the agent."""
    kept = (y != -100).double()
    return (kept * weight[y.clamp_min(0)]).sum() if weight is not None else kept.sum()


def _contributions(model: nn.Module, x: Tensor, y: Tensor, weight: Tensor | None) -> Tensor:
    """N × P naive per-example gradients of N · Σ_t c_it ℓ_it / Σ_{all} c: their mean is the
    gradient of torch's mean-reduced loss on the batch."""
    n, total = len(y), _count(y, weight)

    def loss(out: Tensor, yi: Tensor) -> Tensor:
        summed = F.cross_entropy(out.transpose(1, 2), yi, weight=weight, reduction="sum")
        return n * summed / total

    return loop_gradients(model, x, y, loss)


def _top_eigenvalue(model: nn.Module, x: Tensor, objective: Callable[[Tensor], Tensor]) -> float:
    return float(torch.linalg.eigvalsh(dense_hessian_of(model, x, objective))[-1])


class FlatCE(nn.CrossEntropyLoss):
    """The usual training-loop wrapper: flattens tokens into the batch dimension."""

    def forward(self, out: Tensor, y: Tensor) -> Tensor:
        return super().forward(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _nll(out: Tensor, y: Tensor) -> Tensor:  # a plain callable: per-token losses, -100 padding
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none")


LOSSES: dict[str, tuple[Any, Any, Tensor | None]] = {  # loss_fn, forward, class weight
    "module": (nn.CrossEntropyLoss(), _transposed, None),
    "module-weighted": (nn.CrossEntropyLoss(weight=WEIGHT), _transposed, WEIGHT),
    "nll-weighted": (
        nn.NLLLoss(weight=WEIGHT),
        lambda m, x: _transposed(m, x).log_softmax(1),
        WEIGHT,
    ),
    "flattening-wrapper": (FlatCE(), None, None),
    "flattening-wrapper-weighted": (FlatCE(weight=WEIGHT), None, WEIGHT),
    "callable": (_nll, None, None),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_the_probe_mean_is_torchs_mean_reduced_loss(name: str) -> None:
    model, x, y = _data()
    loss_fn, forward, weight = LOSSES[name]
    measured, info = count_weighted(loss_fn, y)
    assert info is not None and info.per_element and info.class_weights == (weight is not None)
    assert info.mean == pytest.approx(float(_count(y, weight)) / len(y), rel=1e-12)
    counts = [float(_count(y[i : i + 1], weight)) for i in range(len(y))]
    assert (info.low, info.high) == pytest.approx((min(counts), max(counts)), rel=1e-12)
    out = (forward or (lambda m, t: m(t)))(model, x)
    got = per_example_losses(measured, out, y, len(y))
    want = _torch_mean(y, weight)(model(x))
    torch.testing.assert_close(got.mean(), want, rtol=1e-12, atol=0)
    alone = torch.stack(
        [
            F.cross_entropy(model(x[i : i + 1]).transpose(1, 2), y[i : i + 1], weight=weight,
                            reduction="sum") / info.mean
            for i in range(len(y))
        ]
    )  # fmt: skip
    torch.testing.assert_close(got, alone, rtol=1e-12, atol=0)


GRAM_PATHS = [
    ("tokens", "auto"),
    ("tokens", "ghost"),
    ("tokens", "materialise"),
    ("tokens", "vmap"),
    ("tokens", "loop"),
    ("attention", "auto"),
    ("attention", "vmap"),
    ("gru", "auto"),  # the GRU: the loop fallback, the rest on the hooks
]


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(("kind", "method"), GRAM_PATHS)
def test_the_gram_is_that_of_the_objectives_per_example_contributions(
    kind: str, method: str, weighted: bool
) -> None:
    model, x, y = _data(kind)
    weight = WEIGHT if weighted else None
    measured, _ = count_weighted(nn.CrossEntropyLoss(weight=weight), y)
    got = per_example_gram(
        model, x, y, measured, forward=_transposed, chunk_size=3, method=method, verify=False
    )  # type: ignore[arg-type]
    g = _contributions(model, x, y, weight)
    full = torch.autograd.grad(_torch_mean(y, weight)(model(x)), list(model.parameters()))
    assert rel_err(g.mean(0), torch.cat([t.reshape(-1) for t in full])) < 1e-12  # the reference
    assert rel_err(got.total, g @ g.T) < 1e-10
    if kind == "gru" and method == "auto":
        assert "loop" in got.methods.values()


@pytest.mark.parametrize("backend", ["func", "double-backward"])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_sharpness_is_that_of_torchs_mean_reduced_loss(weighted: bool, backend: str) -> None:
    model, x, y = _data()
    weight = WEIGHT if weighted else None
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    measured, _ = count_weighted(loss_fn, y)
    lam = _top_eigenvalue(model, x, _torch_mean(y, weight))
    old = hessian_eigen(model, x, y, loss_fn, forward=_transposed, tol=1e-10, max_hvps=500)
    assert abs(float(old.eigenvalues[0]) / lam - 1) > 0.05  # the test tells them apart
    got = hessian_eigen(
        model, x, y, measured, forward=_transposed, tol=1e-10, max_hvps=500, chunk_size=3,
        backend=backend,  # type: ignore[arg-type]
    )  # fmt: skip
    assert float(got.eigenvalues[0]) == pytest.approx(lam, rel=1e-7)


def _record(
    tmp_path: Path, loss_fn: Any, probe: tuple[Tensor, Tensor], val: Any = None, **kw: Any
) -> list[Any]:
    model, _, _ = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay where the refs are
    rec = tmp_path / "t.stiff"
    agent = offline_agent(
        model, loss_fn, opt, rec, probe=probe, val_probe=val, gram_every=1, sharpness_every=1,
        density_every="never", overhead_cap=None, hessian_tol=1e-10, max_hvps=300, chunk_size=3,
        **kw,
    )  # fmt: skip
    agent.step(torch.tensor(1.0))  # measures at step 0
    return close_and_read(agent, rec)


@pytest.mark.parametrize("weighted", [False, True])
def test_the_agent_measures_the_mean_reduced_objective_and_says_so(
    tmp_path: Path, weighted: bool
) -> None:
    """A fully padded train example is left out (and of c̄); val examples, all long, do not
    enter c̄ (over train ∪ val it would be larger, and λ1_H too small)."""
    model, x, y = _data()
    weight = WEIGHT if weighted else None
    y_probe = y.clone()
    y_probe[3] = -100  # no counted position: left out of the probe
    vx = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(5))
    vy = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(6))
    msgs = _record(
        tmp_path, nn.CrossEntropyLoss(weight=weight), (x, y_probe), (vx, vy), forward=_transposed
    )
    keep = [i for i in range(len(y)) if i != 3]
    xk, yk = x[keep], y[keep]
    lam = _top_eigenvalue(model, xk, _torch_mean(yk, weight))
    assert last_scalar(msgs, "sharpness/lambda1_h") == pytest.approx(lam, rel=1e-6)
    g = _contributions(model, xk, yk, weight)
    trace_k = float(((g - g.mean(0)) ** 2).sum(1).mean())
    assert last_scalar(msgs, "noise/trace_k") == pytest.approx(trace_k, rel=1e-9)
    said = events(msgs, "token-weighted")
    cbar = float(_count(yk, weight)) / len(keep)
    assert len(said) == 1 and said[0].level == "info"
    assert said[0].attrs["cbar"] == pytest.approx(cbar, rel=1e-12)
    assert f"c̄ = {cbar:.6g}" in said[0].message
    assert events(msgs, "probe-uncounted")
    assert not events(msgs, "class-weighted")


def test_losses_whose_elements_count_alike_are_left_as_they_are() -> None:
    _, _, y = _data()
    full = torch.randint(0, V, (5, T))  # equal lengths, no class weights: c̄ = T = each count
    soft = torch.rand(5, T)
    kl = nn.KLDivLoss(reduction="batchmean")
    for loss, targets in (
        (nn.CrossEntropyLoss(reduction="sum"), y),  # Σ_t c ℓ per example already
        (nn.CrossEntropyLoss(weight=WEIGHT, reduction="sum"), y),
        (nn.CrossEntropyLoss(), full),
        (_nll, full),
        (nn.CrossEntropyLoss(ignore_index=-7), full),
        (nn.MSELoss(), soft),  # regression: every element counts alike
        (kl, soft),
        (nn.CrossEntropyLoss(), torch.tensor([0, 1, 2])),  # one target, no weights
    ):
        assert count_weighted(loss, targets) == (loss, None)


def test_equal_lengths_with_class_weights_divide_by_the_batchs_weight() -> None:
    """Equal lengths, but class weights: each example's own weight sum differs from c̄."""
    model, x, _ = _data()
    y = torch.randint(0, V, x.shape, generator=torch.Generator().manual_seed(2))
    measured, info = count_weighted(nn.CrossEntropyLoss(weight=WEIGHT), y)
    assert info is not None and info.low < info.high
    got = per_example_losses(measured, _transposed(model, x), y, len(y))
    torch.testing.assert_close(got.mean(), _torch_mean(y, WEIGHT)(model(x)), rtol=1e-12, atol=0)


def test_one_target_per_example_with_class_weights_is_the_special_case() -> None:
    """(N,) targets: L_i = w_{y_i} ℓ_i / w̄, as before this release."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 1])
    weight = torch.tensor([1.0, 10.0, 4.0], dtype=torch.float64)
    measured, info = count_weighted(nn.CrossEntropyLoss(weight=weight), y)
    assert info is not None and not info.per_element and info.class_weights
    assert info.mean == pytest.approx(float(weight[y].mean()))
    got = per_example_losses(measured, model(x), y, 6)
    want = weight[y] * F.cross_entropy(model(x), y, reduction="none") / weight[y].mean()
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    torch.testing.assert_close(got.mean(), F.cross_entropy(model(x), y, weight=weight))


_SHARDED = """
import sys
import torch, torch.distributed as dist
from torch import nn
from stiffmon_agent import Agent
from tests.agent.test_token_weighting import WEIGHT, _data, _transposed

dist.init_process_group("gloo")
rank = dist.get_rank()
model, x, y = _data()
loss_fn = nn.CrossEntropyLoss(weight=WEIGHT)
opt = torch.optim.SGD(model.parameters(), lr=0.0)
agent = Agent(model, loss_fn, opt, probe=(x, y), endpoint="",
              record=sys.argv[1] if rank == 0 else None, registry=False, distributed=True,
              forward=_transposed, gram_every=1, sharpness_every=1, density_every="never",
              overhead_cap=None, hessian_tol=1e-10, max_hvps=300, chunk_size=3)
agent.step(loss_fn(_transposed(model, x), y))
agent.close()
print(f"rank {rank} done, disabled: {sorted(agent.disabled)}", flush=True)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_sharded_ranks_share_the_whole_train_probes_count(tmp_path: Path) -> None:
    """Under ``distributed=True`` each rank measures its share (examples 0-3 and 4-7, whose
    mean counts differ): c̄ is the whole train probe's on both, as one process measures."""
    from tests.agent.test_distributed import Group, _kill_tree, finish

    script, rec = tmp_path / "sharded_tokens.py", tmp_path / "sharded.stiff"
    script.write_text(_SHARDED)
    group = Group()
    try:
        out = finish(group.torchrun(str(script), str(rec)), ranks=2)
    finally:
        for proc in group.procs:
            _kill_tree(proc.pid)
            proc.communicate(timeout=10)
    assert all(f"rank {r} done, disabled: []" in out for r in range(2)), out
    msgs = read_session(rec)[0]
    model, x, y = _data()
    lam = _top_eigenvalue(model, x, _torch_mean(y, WEIGHT))
    assert last_scalar(msgs, "sharpness/lambda1_h") == pytest.approx(lam, rel=1e-6)
    g = _contributions(model, x, y, WEIGHT)
    trace_k = float(((g - g.mean(0)) ** 2).sum(1).mean())
    assert last_scalar(msgs, "noise/trace_k") == pytest.approx(trace_k, rel=1e-9)


def _own_means(out: Tensor, y: Tensor) -> Tensor:
    """A callable returning one value per example, each its own token mean (as the Hugging Face
    integration's ``ModelLoss`` does): c̄ cannot apply, the losses are used as they are."""
    tok = F.cross_entropy(out.transpose(1, 2), y, reduction="none")
    return tok.sum(1) / (y != -100).sum(1)


def test_a_loss_returning_one_value_per_example_is_used_as_it_is_and_nothing_is_said(
    tmp_path: Path,
) -> None:
    model, x, y = _data()
    msgs = _record(tmp_path, _own_means, (x, y))
    assert not events(msgs, "token-weighted")

    def mean_of_means(out: Tensor) -> Tensor:
        return _own_means(out, y).mean()

    lam = _top_eigenvalue(model, x, mean_of_means)
    assert last_scalar(msgs, "sharpness/lambda1_h") == pytest.approx(lam, rel=1e-6)
