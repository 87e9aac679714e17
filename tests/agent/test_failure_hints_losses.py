"""Losses the measurements cannot take, said in words with the way out (not torch's internals):
a per-example loss without a graph for one example alone, a loss of more than (output, target),
an op without a second derivative."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon_agent import Agent
from stiffmon_agent.failure_hints import double_backward_hint, loss_signature_note
from stiffmon_agent.metrics import hessian_eigen
from stiffmon_agent.metrics.probe import per_example_losses, unreduced
from tests.agent.metrics.models import MeanVar
from tests.agent.metrics.reference import dense_hessian_of
from tests.agent.recording import close_and_read, metric_errors, offline_agent, train_step


def _errors(
    model: nn.Module,
    loss_fn: Any,
    x: Any,
    y: Tensor,
    tmp_path: Path,
    train_loss: Any = None,
    **kw: Any,
) -> tuple[dict[str, str], Agent]:
    """One training step with every measurement due; the ``metric-error`` messages by metric."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = tmp_path / f"r{len(list(tmp_path.iterdir()))}.stiff"  # a new session each run
    settings: dict[str, Any] = {"gram_every": 1, "sharpness_every": 1, "density_every": 1}
    settings |= kw
    agent = offline_agent(
        model,
        loss_fn,
        opt,
        rec,
        probe=(x, y),
        overhead_cap=None,
        density_steps=4,
        density_runs=1,
        trace_samples=1,
        **settings,
    )
    loss = (train_loss or (lambda out, t: per_example_losses(unreduced(loss_fn), out, t, len(t))))(
        model(x), y
    ).mean()
    train_step(agent, opt, loss)
    return metric_errors(close_and_read(agent, rec)), agent


# ---------------------------------------------------------------- a loss without a graph


def _mined_triplet(emb: Tensor, y: Tensor, margin: float = 0.5) -> Tensor:
    """Batch-hard triplet loss; a batch of one has no triplet: a constant, as mining code
    returns (``torch.zeros``, no ``grad_fn``)."""
    if emb.shape[0] < 2:
        return emb.new_zeros(emb.shape[0])
    d = torch.cdist(emb, emb)
    same = y[:, None] == y[None, :]
    eye = torch.eye(len(y), dtype=torch.bool)
    pos = torch.where(same & ~eye, d, torch.zeros_like(d)).amax(1)
    neg = torch.where(~same, d, torch.full_like(d, 1e9)).amin(1)
    return F.relu(pos - neg + margin)


def _embedder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))


def test_an_example_alone_without_a_graph_gets_the_coupled_loss_way_out(tmp_path: Path) -> None:
    x, y = torch.randn(16, 6), torch.arange(16) % 4
    errors, _ = _errors(_embedder(), _mined_triplet, x, y, tmp_path)
    assert set(errors) == {"gram"}  # the Hessian of the whole probe's loss is measured
    said = errors["gram"]
    assert said.startswith("gram failed: the loss of an example alone has no gradient (")
    assert "in-batch mining" in said and 'pass gram_every="never"' in said
    assert "sharpness, the Hessian trace and density still work" in said
    assert said.index("element 0 of tensors") > said.index("gram_every")  # torch's words last


def test_a_probe_cut_into_pieces_says_which_chunk_size_keeps_it_whole(tmp_path: Path) -> None:
    """The Hessian over chunks: a last chunk of one example has no gradient."""
    x, y = torch.randn(16, 6), torch.arange(16) % 4
    errors, _ = _errors(_embedder(), _mined_triplet, x, y, tmp_path, chunk_size=15)
    for kind in ("sharpness", "density"):
        assert errors[kind].startswith(f"{kind} failed: the loss of an example alone has no")
        assert "a chunk_size= of at least the train probe's 16 examples" in errors[kind]
    errors, _ = _errors(_embedder(), _mined_triplet, x, y, tmp_path, chunk_size=16)
    assert set(errors) == {"gram"}


def test_a_loss_that_never_has_a_graph_says_so(tmp_path: Path) -> None:
    def detached(out: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(out, t, reduction="none").detach()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(12, 6), torch.arange(12) % 3

    def train(out: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(out, t, reduction="none")

    errors, _ = _errors(model, detached, x, y, tmp_path, train_loss=train)
    assert errors["gram"].startswith("gram failed: the probe loss has no gradient: loss_fn's ")
    assert "does not depend on the parameters" in errors["gram"]


# ---------------------------------------------------------------- more inputs than (out, y)


@pytest.mark.parametrize("forward", [None, "first"], ids=["module", "following-the-old-hint"])
def test_gaussian_nll_module_gets_the_callable_to_pass(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, forward: str | None
) -> None:
    """``nn.GaussianNLLLoss()`` with a (mean, var) model; before, the hint was ``forward=…[0]``,
    which then failed with ``missing 1 required positional argument: 'var'`` and no hint."""
    torch.manual_seed(0)
    model = MeanVar()
    x, y = torch.randn(10, 4), torch.randn(10, 2)
    gnll = nn.GaussianNLLLoss()

    def train(out: Any, t: Tensor) -> Tensor:
        return F.gaussian_nll_loss(out[0], t, out[1], reduction="none")

    fwd = (lambda m, b: m(b)[0]) if forward else None
    with caplog.at_level(logging.WARNING, logger="stiffmon_agent"):
        errors, agent = _errors(
            model, gnll, x, y, tmp_path, train_loss=train, forward=fwd, density_every="never"
        )
    fix = 'loss_fn=lambda out, y: F.gaussian_nll_loss(out[0], y, out[1], reduction="none")'
    for kind in ("gram", "sharpness"):
        want = f"{kind} failed: loss_fn GaussianNLLLoss takes 3 inputs (input, target, var)"
        assert errors[kind].startswith(want), errors[kind]
        assert fix in errors[kind] and "forward=" not in errors[kind]
        assert "missing 1 required positional argument" not in errors[kind]
    said = [r.message for r in caplog.records]
    assert "the measurements will fail: loss_fn GaussianNLLLoss takes 3" in said[0]  # at Agent()
    # the callable it names: measured (a float64 loop and a dense Hessian check it in
    # test_fallbacks), its objective the mean of the per-element losses, as the module's
    callable_ = eval(fix.removeprefix("loss_fn="), {"F": F})
    errors, agent = _errors(MeanVar(), callable_, x, y, tmp_path, density_every="never")
    assert errors == {} and agent.disabled == {}
    out = model(x)
    per = per_example_losses(unreduced(callable_), out, y, 10)
    assert torch.allclose(per.mean(), gnll(out[0], y, out[1]), rtol=1e-6)


def _module_inputs(name: str, n: int) -> tuple[Any, Tensor, tuple[Tensor, ...]]:
    """(model output, targets, the module's own arguments) for a loss of more inputs."""
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randn(n, 5, generator=g) for _ in range(3))
    if name == "GaussianNLLLoss":
        var = b.exp()
        return (a, var), c, (a, c, var)
    if name == "TripletMarginLoss":
        return (a, b, c), torch.zeros(n), (a, b, c)
    sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    if name == "MarginRankingLoss":
        return (a[:, 0], b[:, 0]), sign, (a[:, 0], b[:, 0], sign)
    return (a, b), sign, (a, b, sign)  # CosineEmbeddingLoss


@pytest.mark.parametrize(
    ("loss", "inputs"),
    [
        (nn.GaussianNLLLoss(full=True), "input, target, var"),
        (nn.TripletMarginLoss(margin=0.3, p=1.0), "anchor, positive, negative"),
        (nn.MarginRankingLoss(margin=0.2), "input1, input2, target"),
        (nn.CosineEmbeddingLoss(), "input1, input2, target"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_the_callable_each_loss_of_more_inputs_is_told_to_pass_is_that_loss(
    loss: nn.Module, inputs: str
) -> None:
    note = loss_signature_note(loss)
    name = type(loss).__name__
    assert note is not None and note.startswith(f"loss_fn {name} takes")
    assert f"({inputs})" in note
    assert loss_signature_note(unreduced(loss)) == note  # as the measurements hold it
    fix = note.split("e.g. loss_fn=")[1].split(" for a model returning")[0]
    fn = eval(fix, {"F": F})
    out, y, args = _module_inputs(name, 7)
    unreduced_module = type(loss)(**{k: getattr(loss, k) for k in ("margin", "p", "full")
                                     if hasattr(loss, k)}, reduction="none")  # fmt: skip
    torch.testing.assert_close(fn(out, y), unreduced_module(*args), rtol=1e-12, atol=1e-12)


def test_losses_of_two_inputs_and_plain_callables_get_no_note() -> None:
    for loss in (nn.CrossEntropyLoss(), nn.MSELoss(), nn.PoissonNLLLoss(), nn.KLDivLoss()):
        assert loss_signature_note(loss) is None
    assert loss_signature_note(lambda out, y: (out - y).square()) is None
    assert loss_signature_note(lambda out, y, w=1.0: w * (out - y).square()) is None
    assert loss_signature_note(lambda *args: args[0]) is None
    note = loss_signature_note(nn.CTCLoss())
    assert note is not None and "(log_probs, targets, input_lengths, target_lengths)" in note
    summed = loss_signature_note(nn.GaussianNLLLoss(reduction="sum"))
    assert summed is not None and 'give the callable reduction = "sum"' in summed

    def three(out: Tensor, y: Tensor, var: Tensor) -> Tensor:
        return (out - y).square() / var

    said = loss_signature_note(three)
    assert said is not None and said.startswith("loss_fn three takes 3 inputs (out, y, var)")


# ---------------------------------------------------------------- no second derivative


def _torch_error(run: Any) -> str:
    """The message torch raises for a double backward through ``run(w)``."""
    w = torch.randn(5, 4, requires_grad=True)
    with pytest.raises(RuntimeError) as info:  # NotImplementedError is one
        (g,) = torch.autograd.grad(run(w), w, create_graph=True)
        torch.autograd.grad(g.square().sum(), w)
    return str(info.value)


def test_multi_margin_loss_names_the_op_the_module_and_the_way_out(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    x, y = torch.randn(12, 6), torch.arange(12) % 4
    errors, _ = _errors(model, nn.MultiMarginLoss(), x, y, tmp_path)
    assert set(errors) == {"sharpness", "density"}  # the Gram needs no second derivative
    for kind in ("sharpness", "density"):
        assert errors[kind].startswith(
            f"{kind} failed: torch has no second derivative for multi_margin_loss "
            "(nn.MultiMarginLoss), which the Hessian measurements need: write it with plain "
            'differentiable ops or pass sharpness_every="never", density_every="never"; the '
            "Gram measurements are unaffected ("
        )


@pytest.mark.parametrize(
    ("run", "modules", "says"),
    [
        (
            lambda w: F.multilabel_margin_loss(w, torch.tensor([[0, 1, -1, 0]] * 5)),
            [nn.MultiLabelMarginLoss()],
            "multilabel_margin_loss (nn.MultiLabelMarginLoss)",
        ),
        (
            lambda w: F.ctc_loss(
                F.log_softmax(w.reshape(5, 1, 4), -1),
                torch.tensor([[1, 2]]),
                torch.tensor([5]),
                torch.tensor([2]),
            ),
            [nn.CTCLoss()],
            "ctc_loss (nn.CTCLoss)",
        ),
        (
            lambda w: (
                F.embedding_bag(torch.tensor([0, 1, 2, 3]), w, torch.tensor([0, 2])).square().sum()
            ),
            [nn.CrossEntropyLoss(), nn.EmbeddingBag(5, 4)],
            "embedding_bag (nn.EmbeddingBag)",
        ),
    ],
    ids=["multilabel-margin", "ctc", "embedding-bag"],
)
def test_every_phrasing_of_a_missing_double_backward_is_recognised(
    run: Any, modules: list[nn.Module], says: str
) -> None:
    text = _torch_error(run)
    loss, *layers = modules
    model = nn.Sequential(nn.Linear(2, 2), *layers)
    hint = double_backward_hint("sharpness", text, model, loss)
    assert hint is not None and hint.startswith(f"torch has no second derivative for {says},")
    assert double_backward_hint("sharpness", "unsupported layer XYZ", model, loss) is None


def multi_margin(out: Tensor, y: Tensor) -> Tensor:
    """``nn.MultiMarginLoss()`` per example with plain ops, as the README writes it."""
    return (
        F.relu(1 - out.gather(1, y[:, None]) + out).scatter(1, y[:, None], 0.0).sum(1)
        / out.shape[1]
    )


def test_the_readme_multi_margin_form_is_the_loss_and_has_a_hessian() -> None:
    g = torch.Generator().manual_seed(0)
    out = (torch.randn(64, 10, generator=g, dtype=torch.float64) * 2).requires_grad_()
    y = torch.randint(0, 10, (64,), generator=g)
    want = F.multi_margin_loss(out, y, reduction="none")
    got = multi_margin(out, y)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g_want,) = torch.autograd.grad(want.sum(), out)
    (g_got,) = torch.autograd.grad(got.sum(), out)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x, t = torch.randn(12, 6, dtype=torch.float64), torch.arange(12) % 4
    top = float(hessian_eigen(model, x, t, multi_margin, tol=1e-8, max_hvps=100).eigenvalues[0])
    dense = dense_hessian_of(model, x, lambda o: multi_margin(o, t).mean())
    assert abs(top - float(torch.linalg.eigvalsh(dense)[-1])) < 1e-6 * abs(top)
