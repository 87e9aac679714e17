"""Per-example Gram matrix against a float64 loop of single-example backward passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stiffmon_agent.metrics import per_example_gradients, per_example_gram
from stiffmon_agent.metrics.gram.conv import unfold
from tests.agent.metrics.models import dict_case, make_cases
from tests.agent.metrics.reference import loop_gradients, loop_gram, rel_err

CASES = make_cases()
CE = nn.CrossEntropyLoss()


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("method", ["auto", "ghost", "materialise"])
def test_gram_matches_loop_reference(name: str, method: str) -> None:
    model, x, y = CASES[name]
    ref = loop_gram(model, x, y, CE)
    got = per_example_gram(model, x, y, CE, method=method, chunk_size=4)  # type: ignore[arg-type]
    assert got.total.dtype == torch.float64
    assert rel_err(got.total, ref) < 1e-10, got.methods
    summed = sum(got.layers.values())
    assert rel_err(summed, ref) < 1e-10  # type: ignore[arg-type]


def test_fast_path_is_used_where_it_applies() -> None:
    got = per_example_gram(*CASES["cnn"], CE)
    assert set(got.methods.values()) <= {"ghost", "materialise"}
    got = per_example_gram(*CASES["transformer"], CE)
    assert got.methods["head"] == "ghost"
    assert got.methods["enc.linear1"] in ("ghost", "materialise")
    assert got.methods["emb"] == "ghost" and got.methods["norm"] == "materialise"
    # MultiheadAttention: its projections re-expressed during the hook pass
    assert got.methods["enc.self_attn"] in ("ghost", "materialise")
    assert got.methods["enc.self_attn.out_proj"] in ("ghost", "materialise")
    # not batch-first: the Linear layers inside the encoder go through vmap, still exact; the
    # attention reads its own layout
    got = per_example_gram(*CASES["transformer-seq-first"], CE)
    assert got.methods["enc.linear1"] == "vmap"
    assert got.methods["enc.self_attn"] in ("ghost", "materialise")
    # a weight tied across Linear modules: every use materialised and summed (test_tied_weights)
    got = per_example_gram(*CASES["shared-weights"], CE)
    assert got.methods["shared"] in ("ghost", "materialise")  # one module called twice
    assert got.methods["a"] == "materialise"


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_per_layer_blocks_match_reference(name: str) -> None:
    model, x, y = CASES[name]
    grads = loop_gradients(model, x, y, CE)
    got = per_example_gram(model, x, y, CE)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    offsets, start = {}, 0
    for n, p in params:
        offsets[n] = slice(start, start + p.numel())
        start += p.numel()
    for layer, block in got.layers.items():
        cols = [
            offsets[n]
            for n, _ in params
            if (n.rsplit(".", 1)[0] if "." in n else "(root)") == layer
        ]
        g = torch.cat([grads[:, c] for c in cols], dim=1)
        assert rel_err(block, g @ g.T) < 1e-10, layer


@pytest.mark.parametrize(
    ("shape", "kernel", "dilation", "stride"),
    [
        ((3, 4, 9, 9), (3, 3), (1, 1), (1, 1)),
        ((2, 6, 9, 10), (3, 2), (2, 1), (2, 1)),
        ((2, 3, 10, 11), (2, 3), (1, 2), (1, 3)),
        ((2, 2, 1, 12), (1, 4), (1, 3), (1, 2)),  # a Conv1d as a Conv2d of height 1
        ((1, 1, 3, 3), (3, 3), (1, 1), (2, 2)),  # one patch
    ],
)
def test_strided_unfold_equals_f_unfold(
    shape: tuple[int, ...],
    kernel: tuple[int, int],
    dilation: tuple[int, int],
    stride: tuple[int, int],
) -> None:
    x = torch.randn(*shape, dtype=torch.float64)
    ref = nn.functional.unfold(x, kernel, dilation=dilation, stride=stride)
    assert torch.equal(unfold(x, kernel, dilation, stride), ref)


def test_vmap_baseline_and_chunking_agree() -> None:
    model, x, y = CASES["cnn"]
    ref = loop_gram(model, x, y, CE)
    for chunk in (1, 3, None):
        got = per_example_gram(model, x, y, CE, chunk_size=chunk)
        assert rel_err(got.total, ref) < 1e-10
    assert rel_err(per_example_gram(model, x, y, CE, method="vmap").total, ref) < 1e-10
    g = per_example_gradients(model, x, y, CE)
    assert rel_err(g @ g.T, ref) < 1e-10


def test_dict_batch_with_custom_forward() -> None:
    model, inputs, y, forward = dict_case()
    ref = loop_gram(model, inputs, y, CE, forward=forward)
    got = per_example_gram(model, inputs, y, CE, forward=forward, chunk_size=3)
    assert rel_err(got.total, ref) < 1e-10


def test_tuple_inputs() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.lin(a * b)

    model = Two().double()
    g = torch.Generator().manual_seed(3)
    a, b = (
        torch.randn(6, 5, generator=g, dtype=torch.float64),
        torch.randn(6, 5, generator=g, dtype=torch.float64),
    )
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    ref = loop_gram(model, (a, b), y, CE)
    assert rel_err(per_example_gram(model, (a, b), y, CE).total, ref) < 1e-10


def test_float32_is_close_to_float64_reference() -> None:
    model, x, y = CASES["cnn"]
    ref = loop_gram(model, x, y, CE)
    m32 = CASES["cnn"][0].float()
    try:
        got = per_example_gram(m32, x.float(), y, CE)
        assert got.total.dtype == torch.float32
        assert rel_err(got.total.double(), ref) < 1e-4
    finally:
        m32.double()


def test_per_example_loss_callable_and_sequence_losses() -> None:
    model, x, y = CASES["mlp"]

    def per_example(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, t, reduction="none")

    ref = loop_gram(model, x, y, CE)
    assert rel_err(per_example_gram(model, x, y, per_example).total, ref) < 1e-10
    with pytest.raises(ValueError, match="one loss per example"):
        per_example_gram(model, x, y, lambda o, t: nn.functional.cross_entropy(o, t))


def test_edge_cases() -> None:
    model, x, y = CASES["mlp"]
    one = per_example_gram(model, x[:1], y[:1], CE)
    assert one.total.shape == (1, 1) and float(one.total[0, 0]) > 0
    frozen = nn.Linear(3, 2).double().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        per_example_gram(frozen, torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0, 1]), CE)
    with pytest.raises(ValueError, match="different numbers"):
        per_example_gram(model, x, y[:3], CE)
    # NaN in the model: NaN out, no crash
    bad = nn.Sequential(nn.Linear(6, 3)).double()
    with torch.no_grad():
        bad[0].weight[0, 0] = float("nan")
    assert torch.isnan(per_example_gram(bad, x, y, CE).total).any()
    # zero gradients: MSE at its minimum
    lin = nn.Linear(2, 1, bias=False).double()
    xs = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    tgt = lin(xs).detach()
    tgt[1] += 1.0
    g = per_example_gram(lin, xs, tgt, nn.MSELoss()).total
    assert float(g[0, 0]) == 0.0 and float(g[1, 1]) > 0


class _SeqFirst(nn.Module):
    """Applies a Linear to a (T, N, d) sequence-first tensor and has no batch_first attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.transpose(0, 1)).mean(dim=0)


def test_verification_catches_a_hidden_sequence_first_layer() -> None:
    torch.manual_seed(0)
    model = _SeqFirst().double()
    x = torch.randn(5, 5, 4, dtype=torch.float64)  # T == N: shapes alone cannot tell
    y = torch.tensor([0, 1, 2, 0, 1])
    ref = loop_gram(model, x, y, CE)
    with pytest.warns(RuntimeWarning, match="exact per-example path"):
        got = per_example_gram(model, x, y, CE)
    assert rel_err(got.total, ref) < 1e-10
    assert set(got.methods.values()) == {"vmap"}


def test_batchnorm_without_running_stats_falls_back_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3, track_running_stats=False),  # batch statistics even in eval mode
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 3),
    ).double()
    x = torch.randn(8, 1, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    ref = loop_gram(model, x, y, CE)  # per-example: a batch of one
    with pytest.warns(RuntimeWarning):
        got = per_example_gram(model, x, y, CE)
    assert rel_err(got.total, ref) < 1e-10


def test_embedding_padding_idx() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(9, 4, padding_idx=0), nn.Flatten(), nn.Linear(12, 3)
    ).double()
    x = torch.tensor([[0, 1, 2], [1, 1, 0], [3, 0, 0], [2, 5, 8], [0, 0, 0], [4, 4, 4]])
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    got = per_example_gram(model, x, y, CE)
    assert got.methods["0"] == "ghost"
    assert rel_err(got.total, loop_gram(model, x, y, CE)) < 1e-10


class _Positions(nn.Module):
    """Token + positional embeddings; ``use`` says how the shared positional output is used."""

    def __init__(self, use: str) -> None:
        super().__init__()
        self.use = use
        self.tok, self.pos, self.head = nn.Embedding(9, 4), nn.Embedding(5, 4), nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        p = self.pos(torch.arange(tokens.shape[1]))
        h = self.tok(tokens)
        if self.use == "broadcast":  # (T, d) + (N, T, d)
            return self.head(torch.tanh(h + p).mean(dim=1))
        if self.use == "unsqueeze":  # expanded, the shapes no longer work out
            return self.head(torch.tanh(h + p.unsqueeze(0)).mean(dim=1))
        # reduced over everything: the same value expanded, but the gradients mix the examples
        return self.head(torch.tanh(h).mean(dim=1)) * (1 + p.square().mean())


@pytest.mark.parametrize("use", ["broadcast", "unsqueeze", "reduced"])
def test_shared_positional_embedding(use: str) -> None:
    torch.manual_seed(0)
    model = _Positions(use).double()
    x = torch.randint(0, 9, (7, 5), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (7,), generator=torch.Generator().manual_seed(1))
    ref = loop_gram(model, x, y, CE)
    if use == "reduced":  # expanding changes the value: the safety net sees it
        with pytest.warns(RuntimeWarning, match="exact per-example path"):
            got = per_example_gram(model, x, y, CE)
    else:
        got = per_example_gram(model, x, y, CE)
    assert rel_err(got.total, ref) < 1e-10
    expected = {"broadcast": "ghost", "unsqueeze": "vmap", "reduced": "vmap"}[use]
    assert got.methods["pos"] == expected, got.methods
    assert got.methods["tok"] == ("vmap" if use == "reduced" else "ghost")


def test_shared_call_stays_shared_when_a_chunk_has_t_examples() -> None:
    """Chunks of 8 and 5 examples with T = 5: the last chunk's positional call looks
    per-example by its shape, but it was shared in the first chunk and stays so."""
    torch.manual_seed(0)
    model = _Positions("broadcast").double()
    x = torch.randint(0, 9, (13, 5), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (13,), generator=torch.Generator().manual_seed(1))
    got = per_example_gram(model, x, y, CE, chunk_size=8)
    assert rel_err(got.total, loop_gram(model, x, y, CE)) < 1e-10
    assert got.methods["pos"] == "ghost", got.methods
