"""Sharpness restricted to the embedding rows the probe touches equals the full computation.

H = H_TT ⊕ 0 for the rows no probe index selects; under a diagonal preconditioner and a
coupled-L2 shift the untouched block is the diagonal S/P. Each λ is checked against a float64
dense Hessian of all P parameters (``torch.autograd.functional.hessian``) and the eigenvalues
of D (H + S) D built from it, with P computed here from Adam's state by the README formula.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon_agent.metrics import hessian_eigen, measurement_mode
from stiffmon_agent.metrics.preconditioner import coupled_decay, diagonal_preconditioner
from stiffmon_agent.metrics.restricted import find_restriction

R, D = 60, 3
CE = nn.CrossEntropyLoss()
TIGHT = {"tol": 1e-12, "max_hvps": 200}


class Rec(nn.Module):
    """Two tables (user, item), a tanh MLP on their concatenation, 3 classes."""

    def __init__(self, sparse: bool = False, **emb: object) -> None:
        super().__init__()
        self.user = nn.Embedding(R, D, sparse=sparse, **emb)  # type: ignore[arg-type]
        self.item = nn.Embedding(R + 7, D, sparse=sparse)
        self.fc = nn.Linear(2 * D, 3)

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.cat([self.user(ids[:, 0]), self.item(ids[:, 1])], 1)
        out: Tensor = self.fc(torch.tanh(h))
        return out


def _probe(n: int = 10) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.stack(
        [torch.randint(0, 9, (n,), generator=g), torch.randint(20, 28, (n,), generator=g)], 1
    )
    return ids, torch.randint(0, 3, (n,), generator=g)


def _dense_h(model: nn.Module, x: Tensor, y: Tensor, loss=CE) -> Tensor:  # type: ignore[no-untyped-def]
    """The dense Hessian of all trainable parameters (flattened in order), ``torch.func``."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(v: Tensor) -> Tensor:
        ps = {
            n: c.view(s)
            for n, c, s in zip(names, v.split([s.numel() for s in shapes]), shapes, strict=True)
        }
        return loss(torch.func.functional_call(model, ps, (x,), strict=False), y).mean()

    with measurement_mode(model):
        return torch.func.hessian(f)(flat)


def _top(m: Tensor, k: int) -> Tensor:
    return torch.linalg.eigvalsh((m + m.T) / 2).flip(0)[:k]


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def _dim(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_raw_hessian_top_k_equals_dense_reference(sparse: bool, chunk_size: int | None) -> None:
    torch.manual_seed(0)
    model = Rec(sparse=sparse).double()
    twin = Rec().double()  # the dense twin: autograd's dense Hessian has no sparse gradients
    twin.load_state_dict(model.state_dict())
    x, y = _probe()
    ref = _top(_dense_h(twin, x, y), 3)
    res = hessian_eigen(model, x, y, CE, k=3, chunk_size=chunk_size, restrict=True, **TIGHT)  # type: ignore[arg-type]
    assert _rel(res.eigenvalues, ref) < 1e-9, (res.eigenvalues, ref)
    # solved on the touched rows only: ≤ 9 user rows + 8 item rows of 3, and the head's 21
    assert res.warm_start.shape[0] <= (9 + 8) * D + 21 < _dim(model)
    full = hessian_eigen(model, x, y, CE, k=3, restrict=False, **TIGHT)  # type: ignore[arg-type]
    assert full.warm_start.shape[0] == _dim(model)
    assert _rel(res.eigenvalues, full.eigenvalues) < 1e-9
    assert model.user.weight.requires_grad and not hasattr(model.user, "stiffmon_rows")


def test_concave_touched_block_gives_the_untouched_zero() -> None:
    """A loss concave in every touched coordinate: λ1 of the whole H is the zero block's 0."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(R, D)).double()
    x = torch.tensor([[1], [4], [5]])
    y = torch.zeros(3)

    def loss(out: Tensor, t: Tensor) -> Tensor:
        return -(out**2).sum((1, 2)) + t

    ref = _top(_dense_h(model, x, y, loss), 2)
    res = hessian_eigen(model, x, y, loss, k=2, restrict=True, **TIGHT)
    assert float(ref[0]) == 0.0 and torch.equal(res.eigenvalues.double(), ref.double())
    assert res.warm_start.shape[0] == 3 * D


def _adam_trained(weight_decay: float, steps: int = 3) -> tuple[Rec, torch.optim.Adam]:
    torch.manual_seed(2)
    model = Rec().double()
    with torch.no_grad():
        model.user.weight[40:] = 0.0  # never touched, zero: v = 0 even with coupled decay
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):  # rows 0..14 / 20..34 trained; the probe touches fewer
        ids = torch.stack(
            [torch.randint(0, 15, (16,), generator=g), torch.randint(20, 35, (16,), generator=g)], 1
        )
        opt.zero_grad()
        CE(model(ids), torch.randint(0, 3, (16,), generator=g)).backward()
        opt.step()
    return model, opt


def _adam_p(opt: torch.optim.Adam, params: list[nn.Parameter]) -> Tensor:
    """P = (1−β1^t)·(√(v_t/(1−β2^t)) + ε), the README's formula, from the optimizer state."""
    (b1, b2), eps = opt.defaults["betas"], opt.defaults["eps"]
    out = []
    for p in params:
        st = opt.state[p]
        t = float(st["step"])
        out.append(((1 - b1**t) * ((st["exp_avg_sq"] / (1 - b2**t)).sqrt() + eps)).reshape(-1))
    return torch.cat(out)


@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_adam_preconditioned_equals_dense_reference(wd: float) -> None:
    model, opt = _adam_trained(wd)
    x, y = _probe()
    params = list(model.parameters())
    pre = _adam_p(opt, params)
    ours_p, why = diagonal_preconditioner(opt, params)
    assert ours_p is not None, why
    assert _rel(ours_p, pre) < 1e-12
    shift = coupled_decay(opt, params)
    assert (shift is None) == (wd == 0.0)
    h = _dense_h(model, x, y)
    d = pre.rsqrt()
    ref = _top(d[:, None] * (h + wd * torch.eye(len(pre), dtype=h.dtype)) * d[None, :], 3)
    res = hessian_eigen(
        model, x, y, CE, k=3, preconditioner=pre, shift=shift, restrict=True, **TIGHT
    )  # type: ignore[arg-type]
    full = hessian_eigen(
        model,
        x,
        y,
        CE,
        k=3,
        preconditioner=pre,
        shift=shift,
        restrict=False,
        **TIGHT,  # type: ignore[arg-type]
    )
    assert _rel(res.eigenvalues, ref) < 1e-9, (res.eigenvalues, ref, full.eigenvalues)
    assert res.warm_start.shape[0] < _dim(model)
    if wd:
        # the never-trained rows have v = 0: their wd / P = wd / ((1−β1^t) ε) tops everything
        b1, eps = opt.defaults["betas"][0], opt.defaults["eps"]
        assert math.isclose(float(res.eigenvalues[0]), wd / ((1 - b1**3) * eps), rel_tol=1e-12)
        assert _rel(full.eigenvalues[:1], ref[:1]) < 1e-9
        touched = hessian_eigen(
            model, x, y, CE, preconditioner=pre, shift=None, restrict=True, **TIGHT
        )  # type: ignore[arg-type]
        assert float(touched.eigenvalues[0]) < 1e-3 * float(res.eigenvalues[0])


def test_sgd_with_coupled_decay_measures_the_raw_hessian() -> None:
    torch.manual_seed(4)
    model = Rec().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-2)
    x, y = _probe()
    CE(model(x), y).backward()
    opt.step()
    ref = _top(_dense_h(model, x, y), 2)
    res = hessian_eigen(model, x, y, CE, k=2, restrict=True, **TIGHT)  # type: ignore[arg-type]
    assert _rel(res.eigenvalues, ref) < 1e-9


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(R, D)

    def forward(self, ids: Tensor) -> Tensor:
        return F.linear(torch.tanh(self.emb(ids[:, 0])), self.emb.weight)[:, :3]


class Direct(Rec):
    def forward(self, ids: Tensor) -> Tensor:
        h = torch.cat([self.user(ids[:, 0]), F.embedding(ids[:, 1], self.item.weight)], 1)
        return self.fc(torch.tanh(h))


class Penalised(Rec):
    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(ids) + 1e-2 * (self.user.weight**2).sum()


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Embedding(R, D)
        self.b = nn.Embedding(R, D)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(2 * D, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.fc(torch.tanh(torch.cat([self.a(ids[:, 0]), self.b(ids[:, 1] - 20)], 1)))


@pytest.mark.parametrize(
    ("make", "table", "why"),
    [
        (lambda: Rec(padding_idx=0), "user.weight", "padding_idx"),
        (lambda: Rec(max_norm=0.5), "user.weight", "max_norm"),
        (Tied, "emb.weight", "also used by"),
        (Direct, "item.weight", "outside the module"),
        (Penalised, "user.weight", "also used by"),
        (Shared, "a.weight", "shared"),
    ],
)
def test_what_is_not_exactly_restrictable_stays_whole(make, table: str, why: str) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(7)
    model = make().double()
    x, y = _probe()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    with measurement_mode(model):
        found = find_restriction(model, [lambda: CE(model(x), y)], names)
    assert why in found.kept.get(table, ""), found.kept
    assert table not in {t.name for t in found.tables}
    quick = {"tol": 1e-8, "max_hvps": 60}
    res = hessian_eigen(model, x, y, CE, k=2, restrict=True, **quick)  # type: ignore[arg-type]
    full = hessian_eigen(model, x, y, CE, k=2, restrict=False, **quick)  # type: ignore[arg-type]
    # the table kept whole is in the solved coordinates: its whole weight, every row
    kept = dict(model.named_parameters())[table].numel()
    assert res.warm_start.shape[0] >= kept
    assert _rel(res.eigenvalues, full.eigenvalues) < 1e-7
    if why == "max_norm":
        return  # renormalises its weight in place: no torch.func Hessian to compare with
    ref = _top(_dense_h(model, x, y), 2)
    assert _rel(res.eigenvalues, ref) < 1e-7, (res.eigenvalues, ref)


def test_embedding_bag_is_never_restricted() -> None:
    model = nn.EmbeddingBag(R, D, mode="sum")
    x = torch.tensor([[1, 2], [3, 4]])
    found = find_restriction(
        model, [lambda: model(x, per_sample_weights=torch.ones(2, 2))], ["weight"]
    )
    assert not found.tables


class Negatives(Rec):
    """Scores a positive item against one random negative drawn in the forward."""

    def forward(self, ids: Tensor) -> Tensor:
        neg = torch.randint(20, 40, (ids.shape[0],))
        u = self.user(ids[:, 0])
        pos = (u * self.item(ids[:, 1])).sum(1)
        return torch.stack([pos, (u * self.item(neg)).sum(1), pos * 0], 1)


def test_random_indices_drawn_in_the_forward_are_found_per_chunk() -> None:
    torch.manual_seed(8)
    model = Negatives().double()
    x, y = _probe(12)
    res = hessian_eigen(model, x, y, CE, k=2, chunk_size=5, restrict=True, **TIGHT)  # type: ignore[arg-type]
    full = hessian_eigen(model, x, y, CE, k=2, chunk_size=5, restrict=False, **TIGHT)  # type: ignore[arg-type]
    assert res.warm_start.shape[0] < full.warm_start.shape[0]
    assert _rel(res.eigenvalues, full.eigenvalues) < 1e-9


def test_a_frequency_scaled_table_is_measured_unscaled_and_restricted() -> None:
    """measurement_mode switches ``scale_grad_by_freq`` off (its backward is not a gradient),
    so the table is restricted like any other and λ is the loss's dense Hessian's."""
    torch.manual_seed(7)
    model = Rec(scale_grad_by_freq=True).double()
    twin = Rec().double()
    twin.load_state_dict(model.state_dict())
    x, y = _probe()
    ref = _top(_dense_h(twin, x, y), 2)
    res = hessian_eigen(model, x, y, CE, k=2, restrict=True, **TIGHT)  # type: ignore[arg-type]
    assert res.warm_start.shape[0] < _dim(model)
    assert _rel(res.eigenvalues, ref) < 1e-9
    assert model.user.scale_grad_by_freq  # restored
