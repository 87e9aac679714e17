"""Probe examples without a counted target (every position the loss's ignore_index: a fully
masked prompt) are left out of the probe and said: as zero-gradient examples they diluted every
probe mean (Tr K by 1/N, λ1_H by (N − 1)/N)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon import protocol as p
from stiffmon.session import read_session
from stiffmon_agent import Agent
from stiffmon_agent.metrics.gram import per_example_gram
from stiffmon_agent.probe_set import make_probe, without_uncounted
from tests.agent.metrics.reference import loop_gram, rel_err

V, T = 7, 5


def _tokens(n: int, empty: list[int], ignore: int = -100) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, V, (n, T), generator=g)
    y = torch.randint(0, V, (n, T), generator=g)
    y[:, 3:] = ignore  # padding everywhere, as usual
    for i in empty:
        y[i] = ignore
    return x, y


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).transpose(1, 2)  # (B, V, T), as nn.CrossEntropyLoss takes it


def test_examples_without_a_counted_target_are_left_out_and_named() -> None:
    x, y = _tokens(8, [3])
    xv, yv = _tokens(4, [0, 2])
    probe = make_probe((x, y), (xv, yv), None, None, None)
    kept, note = without_uncounted(probe, nn.CrossEntropyLoss())
    assert (kept.n_train, kept.n) == (7, 9)
    keep = [i for i in range(12) if i not in (3, 8, 10)]
    assert torch.equal(kept.inputs, probe.inputs[keep])
    assert torch.equal(kept.targets, probe.targets[keep])
    assert "3 (train), 0 (val), 2 (val)" in note and "7 train and 2 val" in note
    # another ignore index: the loss's own
    x7, y7 = _tokens(6, [5], ignore=-7)
    probe7 = make_probe((x7, y7), None, None, None, None)
    assert without_uncounted(probe7, nn.CrossEntropyLoss(ignore_index=-7))[0].n == 5
    assert without_uncounted(probe7, nn.CrossEntropyLoss())[0].n == 6  # -7 counts there (!)


def test_nothing_changes_where_every_example_counts_or_targets_are_not_per_element() -> None:
    x, y = _tokens(6, [])
    probe = make_probe((x, y), None, None, None, None)
    assert without_uncounted(probe, nn.CrossEntropyLoss()) == (probe, "")
    labels = make_probe((torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])), None, None, None, None)
    assert without_uncounted(labels, nn.CrossEntropyLoss()) == (labels, "")
    summed = make_probe(_tokens(6, [2]), None, None, None, None)  # a sum: 0 is its true loss
    assert without_uncounted(summed, nn.CrossEntropyLoss(reduction="sum"))[0].n == 6


def test_a_train_probe_with_nothing_counted_is_refused() -> None:
    probe = make_probe(_tokens(2, [0, 1]), _tokens(2, []), None, None, None)
    with pytest.raises(ValueError, match="no example of the train probe has a counted target"):
        without_uncounted(probe, nn.CrossEntropyLoss())


def test_the_agent_measures_the_counted_examples_and_says_so(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(V, 8), nn.Linear(8, V)).double()
    x, y = _tokens(8, [3])
    rec = tmp_path / "pad.stiff"
    agent = Agent(
        model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1),
        probe=(x, y), forward=_forward, record=rec, endpoint="", registry=False,
        gram_every=1, sharpness_every="never", overhead_cap=None,
    )  # fmt: skip
    agent.step(1.0)
    agent.close()
    msgs = read_session(rec)[0]
    hello = next(m for m in msgs if isinstance(m, p.Hello))
    assert hello.probe_train == 7
    said = [m for m in msgs if isinstance(m, p.Event) and m.code == "probe-uncounted"]
    assert len(said) == 1 and said[0].level == "warning" and "3 (train)" in said[0].message
    keep = [i for i in range(8) if i != 3]
    ref = loop_gram(model, x[keep], y[keep], lambda out, t: F.cross_entropy(out.transpose(1, 2), t))
    grads = ref.diagonal()
    trace = next(m for m in msgs if isinstance(m, p.Scalars) and "noise/trace_k" in m.as_dict())
    got = per_example_gram(model, x[keep], y[keep], nn.CrossEntropyLoss(), forward=_forward).total
    assert rel_err(got, ref) < 1e-10
    n = len(keep)  # Tr K = (1/N) Σ ‖g_i − ḡ‖², ‖ḡ‖² = Σ G / N²
    ref_trace = float(grads.sum() - ref.sum() / n) / n
    assert trace.as_dict()["noise/trace_k"] == pytest.approx(ref_trace, rel=1e-9)


def test_a_probe_that_is_not_a_pair_says_what_it_needs() -> None:
    loader = torch.utils.data.DataLoader(list(zip(torch.randn(4, 3), torch.arange(4), strict=True)))
    with pytest.raises(TypeError, match=r"probe must be an \(inputs, targets\) pair.*DataLoader"):
        make_probe(loader, None, None, None, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="val_probe must be"):
        make_probe((torch.randn(4, 3), torch.arange(4)), (torch.randn(4, 3),), None, None, None)  # type: ignore[arg-type]


@pytest.mark.parametrize("ignore", [-100, 3])
def test_class_labels_set_to_the_ignore_index_are_left_out_and_are_no_class(ignore: int) -> None:
    """(N,) class targets: an example labelled ``ignore_index`` has no loss of its own (the
    mean-reduced loss divides by the counted examples); kept, it was a zero-gradient example
    (λ1_H 17/20 of the truth) and a class of its own ("-100", or 3 of classes 0..3)."""
    torch.manual_seed(0)
    x = torch.randn(20, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2] * 6 + [0, 1])
    y[[1, 6, 11]] = ignore
    loss = nn.CrossEntropyLoss(ignore_index=ignore)
    probe = make_probe((x, y), None, None, None, None, ignore_index=ignore)
    kept, note = without_uncounted(probe, loss)
    assert kept.n_train == 17 and "1 (train), 6 (train), 11 (train)" in note
    assert kept.num_classes == 3 and kept.class_names == ()
    assert kept.labels is not None and set(kept.labels.tolist()) == {0, 1, 2}
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    got = per_example_gram(model, kept.inputs, kept.targets, loss).total
    counted = [i for i in range(20) if i not in (1, 6, 11)]
    assert rel_err(got, loop_gram(model, x[counted], y[counted], nn.CrossEntropyLoss())) < 1e-10
