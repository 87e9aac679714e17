"""Fallbacks (vmap, per-example loop), the safety net, attention HVPs, and no side effects."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from stiffmon_agent.metrics import hessian_eigen, per_example_gram
from tests.agent.metrics.models import MeanVar, make_cases, well_fit_float32_mlp
from tests.agent.metrics.reference import dense_hessian_of, loop_gram, rel_err

CASES = make_cases()
CE = nn.CrossEntropyLoss()


@pytest.mark.parametrize("name", ["gru", "lstm-seq-first", "rnn-max-norm", "embedding-max-norm"])
def test_recurrent_and_max_norm_gram_matches_loop(name: str) -> None:
    model, x, y = CASES[name]
    ref = loop_gram(model, x, y, CE)
    got = per_example_gram(model, x, y, CE, chunk_size=4)
    assert rel_err(got.total, ref) < 1e-10, got.methods
    assert "loop" in got.methods.values() and got.notes


def test_gru_float32() -> None:
    model, x, y = CASES["gru"]
    ref = loop_gram(model, x, y, CE)
    try:
        got = per_example_gram(model.float(), x, y, CE)
        assert got.total.dtype == torch.float32
        assert rel_err(got.total.double(), ref) < 1e-4
    finally:
        model.double()


@pytest.mark.parametrize("name", sorted(CASES))
def test_measurements_leave_parameters_bit_identical(name: str) -> None:
    model, x, y = CASES[name]
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    per_example_gram(model, x, y, CE, chunk_size=4)
    per_example_gram(model, x, y, CE, method="vmap")
    hessian_eigen(model, x, y, CE, k=2, max_hvps=8, generator=torch.Generator().manual_seed(0))
    hessian_eigen(model, x, y, CE, max_hvps=4, chunk_size=3, backend="double-backward")
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), before[k]), k


class _CoupleAllButFirst(nn.Module):
    """Mixes examples 1..N-1 of a batch (not example 0): invisible to a batch of one."""

    def forward(self, h: Tensor) -> Tensor:
        return torch.cat([h[:1], h[1:] + h[1:].mean(dim=0, keepdim=True)])


def test_safety_net_checks_more_than_g00() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), _CoupleAllButFirst(), nn.Tanh(), nn.Linear(5, 3))
    model = model.double()
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    ref = loop_gram(model, x, y, CE)  # the definition: each example as a batch of one
    fast = per_example_gram(model, x, y, CE, verify=False)
    assert float(fast.total[0, 0]) == pytest.approx(float(ref[0, 0]), rel=1e-9)  # G[0,0] passes
    assert rel_err(fast.total, ref) > 1e-2
    with pytest.warns(RuntimeWarning, match="exact per-example path"):
        got = per_example_gram(model, x, y, CE)
    assert rel_err(got.total, ref) < 1e-10 and got.notes


def _dense_hessian(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    model.eval()
    with sdpa_kernel(SDPBackend.MATH):  # the backend with a double backward
        h = dense_hessian_of(model, x, lambda out: CE(out, y), vectorize=True)
    model.train()
    return h


@pytest.mark.parametrize("name", ["transformer", "gru"])
def test_sharpness_through_attention_and_rnns_matches_dense_hessian(name: str) -> None:
    model, x, y = CASES[name]
    ref = torch.linalg.eigvalsh(_dense_hessian(model, x[:6], y[:6])).flip(0)
    got = hessian_eigen(model, x[:6], y[:6], CE, k=2, tol=1e-9, max_hvps=400)
    assert got.converged
    torch.testing.assert_close(got.eigenvalues, ref[:2], rtol=1e-6, atol=0)


class _PositionalBag(nn.Module):
    """Token + positional embeddings (positions = arange(T)), as in every transformer."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(11, 4)
        self.pos = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.head(torch.tanh(self.tok(tokens) + self.pos(positions)).mean(dim=1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_positional_embedding_with_t_equal_n_is_caught(dtype: torch.dtype) -> None:
    """arange(T) with T == N looks like one token per example to the hook: the net catches it."""
    torch.manual_seed(0)
    model = _PositionalBag().to(dtype)
    x = torch.randint(0, 11, (6, 6), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(1))
    ref = loop_gram(model.double(), x, y, CE)
    model.to(dtype)
    with pytest.warns(RuntimeWarning, match="exact per-example path"):
        got = per_example_gram(model, x, y, CE)
    assert rel_err(got.total.double(), ref) < (1e-10 if dtype == torch.float64 else 1e-5)


def test_a_well_fit_float32_mlp_is_not_taken_for_a_layer_that_couples_examples() -> None:
    """A plain float32 MLP 120 SGD steps into a run on separable data (weights and probe saved
    from the reporting user's script): example 0's loss is 1e-3, and its float32 single-example
    G_00 is 1.4e-4 off the float64 value (1 - p_y cancels), the fast path's 1.7e-5. The net
    confirms a float32 mismatch in float64 before it falls back, so no false alarm, and the
    Gram stays the fast one, equal to the float64 loop to 1e-4."""
    data = np.load(Path(__file__).with_name("well_fit_mlp.npz"), allow_pickle=False)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    model.load_state_dict(
        {k[2:].replace("_", "."): torch.from_numpy(data[k]) for k in data.files if k[:2] == "w_"}
    )
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback warns
        got = per_example_gram(model, x, y, CE)
    assert set(got.methods.values()) != {"vmap"}
    ref = loop_gram(copy.deepcopy(model).double(), x.double(), y, CE)
    assert rel_err(got.total.double(), ref) < 1e-4


def test_the_safety_net_holds_a_float32_gram_to_what_float32_can_do() -> None:
    """At a well-fit example (1 − p_y cancels) even a float32 single-example backward pass is
    far off the float64 G_ii (here ~1e-3 relative): a fast Gram off by 3× that is float32 doing
    its best, not a layer that couples examples (it used to fall back to the exact path), while
    30× that, or 1e-3 at a better-conditioned entry, is still caught."""
    from stiffmon_agent.metrics.gram.verify import _references, check_entries

    model, x, y = well_fit_float32_mlp()
    per = nn.CrossEntropyLoss(reduction="none")
    params = list(model.parameters())

    def forward(m: nn.Module, a: Tensor) -> Tensor:
        return m(a)

    exact = copy.deepcopy(model).double()
    g64 = loop_gram(exact, x.double(), y, CE)
    r32 = _references(model, params, 20, x, y, forward, per)
    errors = {ij: abs(r32[ij][0] - float(g64[ij])) / r32[ij][1] for ij in r32}
    worst = max(errors, key=errors.__getitem__)
    best = min(errors, key=errors.__getitem__)
    assert errors[worst] > 3e-4 and errors[best] < 3e-5, errors

    def check(at: tuple[int, int], off: float) -> str | None:
        total = g64.clone()
        sign = -1.0 if r32[at][0] > float(g64[at]) else 1.0  # away from the float32 value too
        total[at] += sign * off
        return check_entries(model, params, total.float(), x, y, forward, per)

    assert check(worst, 0.0) is None
    float32_error = abs(r32[worst][0] - float(g64[worst]))
    assert check(worst, 3 * float32_error) is None
    assert check(worst, 30 * float32_error) is not None
    assert check(best, 1e-3 * r32[best][1]) is not None


def test_a_float32_mismatch_that_cannot_be_checked_in_float64_does_not_blame_a_layer() -> None:
    """A forward that casts to float32 cannot run on a float64 copy: the mismatch stands, but
    its warning names rounding as a possible cause, not a layer "that couples examples"."""
    from stiffmon_agent.metrics.gram.verify import _references, check_entries, mismatch_note

    model, x, y = well_fit_float32_mlp()
    per = nn.CrossEntropyLoss(reduction="none")
    params = list(model.parameters())

    def float32_forward(m: nn.Module, a: Tensor) -> Tensor:
        return m(a.float())

    g64 = loop_gram(copy.deepcopy(model).double(), x.double(), y, CE)
    r32 = _references(model, params, 20, x, y, float32_forward, per)
    errors = {ij: abs(r32[ij][0] - float(g64[ij])) / r32[ij][1] for ij in r32}
    worst = max(errors, key=errors.__getitem__)
    total = g64.clone()
    total[worst] += (
        (-1.0 if r32[worst][0] > float(g64[worst]) else 1.0)
        * 3
        * abs(r32[worst][0] - float(g64[worst]))
    )
    bad = check_entries(model, params, total.float(), x, y, float32_forward, per)
    assert bad is not None and "not checked again in float64" in bad
    assert "does not run as a float64 copy (RuntimeError" in bad
    note = mismatch_note("per-example Gram fast path", bad)
    assert "rounding of the single-example gradients" in note
    confirmed = mismatch_note("per-example Gram fast path", "G[0,0] = 1 vs 2 (in float64)")
    assert "rounding" not in confirmed and "couples examples" in confirmed


class _DictOut(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.lin = kind, nn.Linear(4, 3)

    def forward(self, x: Tensor) -> object:
        z = self.lin(x)
        if self.kind == "dict":
            return {"aux": x.sum(), "logits": z}
        return (z, x.sum())


@pytest.mark.parametrize(
    ("kind", "fix"),
    [
        ("dict", "forward=lambda model, x: model(x)['logits']"),
        ("tuple", "forward=lambda model, x: model(x)[0]"),
    ],
)
def test_a_model_output_the_loss_cannot_take_says_which_forward_to_pass(
    kind: str, fix: str
) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    model = _DictOut(kind)
    with pytest.raises(TypeError, match="the model returns a ") as info:
        per_example_gram(model, x, y, nn.CrossEntropyLoss())
    assert fix in str(info.value)
    forward = (lambda m, b: m(b)["logits"]) if kind == "dict" else (lambda m, b: m(b)[0])
    got = per_example_gram(model, x, y, nn.CrossEntropyLoss(), forward=forward)
    want = loop_gram(model, x, y, nn.CrossEntropyLoss(), forward)
    assert rel_err(got.total, want) < 1e-5  # with the forward it hints at, the numbers are right


def test_a_gaussian_nll_over_a_mean_variance_output_matches_a_float64_loop() -> None:
    torch.manual_seed(0)
    model = MeanVar().double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)

    def loss(out: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
        return nn.functional.gaussian_nll_loss(out[0], y, out[1], reduction="none")

    got = per_example_gram(model, x, y, loss).total
    rows = []
    for i in range(10):  # example i alone, its mean over the target dimensions
        mean, var = model(x[i : i + 1])
        li = nn.functional.gaussian_nll_loss(mean, y[i : i + 1], var, reduction="mean")
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(li, model.parameters())]))
    want = torch.stack(rows) @ torch.stack(rows).T
    assert rel_err(got, want) < 1e-12
    top = hessian_eigen(model, x, y, loss, tol=1e-8, max_hvps=100).eigenvalues[0]
    dense = dense_hessian_of(model, x, lambda out: loss(out, y).mean())
    assert abs(float(top) - float(torch.linalg.eigvalsh(dense)[-1])) < 1e-6 * abs(float(top))


class _SeqFirstLSTM(nn.Module):
    """A sequence-first classifier: (T, B, F) inputs, the last position's state to the head."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(3, 5), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][-1])


def test_a_sequence_first_model_with_a_batch_first_probe_and_a_transposing_forward() -> None:
    torch.manual_seed(0)
    model = _SeqFirstLSTM().double()
    x = torch.randn(8, 4, 3, dtype=torch.float64)  # the probe batch-first: (B, T, F)
    y = torch.randint(0, 2, (8,))

    def forward(m: nn.Module, b: Tensor) -> Tensor:
        return m(b.transpose(0, 1))

    got = per_example_gram(model, x, y, nn.CrossEntropyLoss(), forward=forward).total
    want = loop_gram(model, x, y, nn.CrossEntropyLoss(), forward)
    assert rel_err(got, want) < 1e-10
