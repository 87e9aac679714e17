"""Stiffness functions against plain-numpy recomputations from a reference Gram matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from stiffmon_agent.metrics import (
    capture_activations,
    class_stiffness,
    cosine_stiffness,
    critical_length,
    mean_pair_cosine,
    pairwise_distances,
    per_example_gram,
    sign_stiffness,
    stiffness_blocks,
    stiffness_vs_distance,
)
from tests.agent.metrics.models import make_cases
from tests.agent.metrics.reference import loop_gradients, loop_gram

CE = nn.CrossEntropyLoss()


@pytest.fixture(scope="module")
def probe() -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
    """Reference Gram (numpy) of a CNN on 10 examples, their labels and inputs."""
    model, x, y = make_cases()["cnn"]
    g = loop_gram(model, x, y, CE).numpy()
    return g, y.numpy(), x.reshape(x.shape[0], -1).numpy(), per_example_gram(model, x, y, CE).total


def np_cosine(g: np.ndarray) -> np.ndarray:
    n = g.shape[0]
    out = np.empty_like(g)
    for i in range(n):
        for j in range(n):
            d = math.sqrt(g[i, i]) * math.sqrt(g[j, j])
            out[i, j] = g[i, j] / d if d > 0 else math.nan
    return out


def np_class(s: np.ndarray, lr: np.ndarray, lc: np.ndarray, k: int, same: bool) -> np.ndarray:
    out = np.full((k, k), math.nan)
    for a in range(k):
        for b in range(k):
            vals = [
                s[i, j]
                for i in range(s.shape[0])
                for j in range(s.shape[1])
                if lr[i] == a and lc[j] == b and not (same and i == j) and not math.isnan(s[i, j])
            ]
            if vals:
                out[a, b] = sum(vals) / len(vals)
    return out


def test_cosine_and_sign(probe: tuple) -> None:
    g_ref, _, _, g = probe
    np.testing.assert_allclose(
        cosine_stiffness(g).numpy(), np_cosine(g_ref), rtol=1e-10, atol=1e-12
    )
    np.testing.assert_array_equal(sign_stiffness(g).numpy(), np.sign(g_ref))


def test_zero_gradient_gives_nan_cosine() -> None:
    g = torch.tensor([[0.0, 0.0, 0.0], [0.0, 4.0, -2.0], [0.0, -2.0, 1.0]], dtype=torch.float64)
    s = cosine_stiffness(g)
    assert torch.isnan(s[0]).all() and torch.isnan(s[:, 0]).all()
    assert float(s[1, 2]) == pytest.approx(-1.0)


def brute_mean_pair_cosine(grads: torch.Tensor) -> float:
    """Mean of cos(g_i, g_j) over pairs i != j of non-zero gradients, from the vectors."""
    rows = [g for g in grads.double() if float(g.norm()) > 0]
    vals = [
        float(a @ b) / (float(a.norm()) * float(b.norm()))
        for i, a in enumerate(rows)
        for j, b in enumerate(rows)
        if i != j
    ]
    return sum(vals) / len(vals) if vals else math.nan


def test_mean_pair_cosine_against_the_vectors() -> None:
    torch.manual_seed(0)
    grads = torch.randn(9, 5, dtype=torch.float64)
    grads[3] = 0.0  # a zero gradient: its pairs are left out, not counted as 0
    grads[7] *= 1e-6  # tiny but non-zero: in
    got = mean_pair_cosine(grads @ grads.T)
    assert got == pytest.approx(brute_mean_pair_cosine(grads), rel=1e-12, abs=1e-15)
    one = torch.zeros(3, 5, dtype=torch.float64)
    one[1] = 1.0
    assert math.isnan(mean_pair_cosine(one @ one.T))  # fewer than two non-zero gradients


def test_layer_stiffness_of_a_measurement_against_per_example_loops() -> None:
    from stiffmon_agent.measure import gram_messages
    from stiffmon_agent.probe_set import make_probe

    model, x, y = make_cases()["cnn"]
    probe = make_probe((x, y), None, None, None, None, torch.float64)
    msgs = gram_messages(model, CE, probe, 0)
    got = next(m.fields for m in msgs if m.cls.KIND == "scalars")
    published = dict(zip(got["values_names"], got["values_raw"], strict=True))
    grads = loop_gradients(model, x, y, CE)  # columns: the parameters in order
    layers: dict[str, list[torch.Tensor]] = {}
    start = 0
    for name, q in model.named_parameters():
        key = name.rsplit(".", 1)[0] if "." in name else "(root)"
        layers.setdefault(key, []).append(grads[:, start : start + q.numel()])
        start += q.numel()
    assert len(layers) >= 2
    for key, cols in layers.items():
        ref = brute_mean_pair_cosine(torch.cat(cols, dim=1))
        assert published[f"layer-stiffness/{key}"] == pytest.approx(ref, rel=1e-10)


def test_class_stiffness_blocks(probe: tuple) -> None:
    g_ref, y, _, g = probe
    s_ref = np_cosine(g_ref)
    s = cosine_stiffness(g)
    n_train = 6
    blocks = stiffness_blocks(s, torch.as_tensor(y), n_train, num_classes=3)
    t, v = slice(0, n_train), slice(n_train, None)
    np.testing.assert_allclose(
        blocks.train_train.matrix.numpy(), np_class(s_ref[t, t], y[t], y[t], 3, True), rtol=1e-10
    )
    assert blocks.train_val is not None and blocks.val_val is not None
    np.testing.assert_allclose(
        blocks.train_val.matrix.numpy(), np_class(s_ref[t, v], y[t], y[v], 3, False), rtol=1e-10
    )
    np.testing.assert_allclose(
        blocks.val_val.matrix.numpy(), np_class(s_ref[v, v], y[v], y[v], 3, True), rtol=1e-10
    )
    m = np_class(s_ref[t, t], y[t], y[t], 3, True)
    assert blocks.train_train.within == pytest.approx(np.nanmean(np.diag(m)), rel=1e-10)
    assert blocks.train_train.between == pytest.approx(
        np.nanmean(m[~np.eye(3, dtype=bool)]), rel=1e-10
    )


def test_class_with_one_example_is_nan_on_the_diagonal() -> None:
    s = torch.tensor([[1.0, 0.5, 0.2], [0.5, 1.0, -0.4], [0.2, -0.4, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    cs = class_stiffness(s, labels, num_classes=3)
    assert math.isnan(float(cs.matrix[1, 1])) and math.isnan(float(cs.matrix[2, 2]))
    assert float(cs.matrix[0, 0]) == pytest.approx(0.5)
    assert float(cs.matrix[0, 1]) == pytest.approx(-0.1)
    assert cs.within == pytest.approx(0.5)
    assert int(cs.counts[0, 0]) == 2 and int(cs.counts[1, 1]) == 0
    one = class_stiffness(torch.ones(1, 1, dtype=torch.float64), torch.tensor([0]))
    assert math.isnan(one.within) and math.isnan(one.between)


def test_distance_curve_against_numpy(probe: tuple) -> None:
    g_ref, _, x, g = probe
    s_ref = np_cosine(g_ref)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = x.shape[0]
    d_ref = np.array([[np.linalg.norm(xn[i] - xn[j]) for j in range(n)] for i in range(n)])
    d = pairwise_distances(torch.as_tensor(x))
    np.testing.assert_allclose(d.numpy(), d_ref, atol=1e-10)
    bins = 5
    curve = stiffness_vs_distance(cosine_stiffness(g), d, bins=bins)
    top = d_ref[np.triu_indices(n, 1)].max()
    edges = np.linspace(0, top, bins + 1)
    sums, counts = np.zeros(bins), np.zeros(bins)
    for i in range(n):
        for j in range(i + 1, n):
            k = min(int(np.searchsorted(edges, d_ref[i, j], side="right")) - 1, bins - 1)
            sums[k] += s_ref[i, j]
            counts[k] += 1
    mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    np.testing.assert_allclose(curve.mean.numpy(), mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(curve.counts.numpy(), counts)
    assert int(curve.counts.sum()) == n * (n - 1) // 2


def test_critical_length() -> None:
    c = torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=torch.float64)
    # crosses between 0.3 (0.2) and 0.5 (-0.2): at 0.4
    assert critical_length(c, torch.tensor([0.5, 0.2, -0.2, -0.1])) == pytest.approx(0.4)
    # empty bin skipped: crossing between 0.1 (0.3) and 0.5 (-0.1) at 0.1 + 0.4·0.75
    nan = float("nan")
    assert critical_length(c, torch.tensor([0.3, nan, -0.1, 0.2])) == pytest.approx(0.4)
    assert critical_length(c, torch.tensor([0.3, 0.0, -0.1, 0.2])) == pytest.approx(0.3)
    assert critical_length(c, torch.tensor([0.3, 0.2, 0.1, 0.05])) is None
    assert critical_length(c, torch.tensor([nan, nan, nan, nan])) is None


def test_activation_distances_per_layer() -> None:
    model, x, y = make_cases()["mlp"]
    acts = capture_activations(model, x, ["0", "2"])
    assert acts["0"].shape == (10, 8) and acts["2"].shape == (10, 3)
    with torch.no_grad():
        model.eval()
        ref = model[0](x)
    torch.testing.assert_close(acts["0"], ref)  # the pre-ReLU output, not the in-place result
    curve = stiffness_vs_distance(
        cosine_stiffness(per_example_gram(model, x, y, CE).total), pairwise_distances(acts["2"]), 4
    )
    assert curve.mean.shape == (4,)
    with pytest.raises(KeyError):
        capture_activations(model, x, ["nope"])
