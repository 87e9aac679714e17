"""What the agent publishes for sharpness and probes: objective, thresholds, hygiene, skips."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from stiffmon import protocol as p
from stiffmon.session import read_session
from stiffmon_agent import Agent
from stiffmon_agent.measure import (
    MeasurementSkipped,
    SharpnessState,
    check_finite,
    gram_messages,
    make_probe,
    sharpness_messages,
)
from stiffmon_agent.metrics import hessian_eigen


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _run(tmp_path: Path, opt_fn: Any, loss_fn: Any, steps: int = 2, **kw: Any) -> list[Any]:
    model = _model()
    opt = opt_fn(model.parameters())
    x, y = _data()
    rec = tmp_path / "r.stiff"
    agent = Agent(
        model,
        loss_fn,
        opt,
        probe=(x[:12], y[:12]),
        endpoint="",
        record=rec,
        gram_every="never",
        sharpness_every=1,
        overhead_cap=1.0,
        registry=False,
        **kw,
    )
    for _ in range(steps):
        out = model(x[12:])
        loss = loss_fn(out, y[12:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        agent.step(loss, out, y[12:])
    agent.close()
    msgs, _ = read_session(rec)
    return msgs


def _scalars(msgs: list[Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in msgs:
        if isinstance(m, p.Scalars) and "sharpness/lambda1_h" in m.names:
            out = m.as_dict()
    return out


def test_adamw_publishes_preconditioned_sharpness(tmp_path: Path) -> None:
    """λ1(P⁻¹H) and its threshold 38/η from Adam's step t = 1/(1−β1) = 10 on (measured at agent
    step 9), before which an info event says why (the spike of t = 1, 1.5e8 against 2,357 twenty
    steps later in a user's run, is no edge of stability and swamped every chart's y range); the
    ``hessian-precond`` spectrum goes out at every step."""
    adamw = lambda ps: torch.optim.AdamW(ps, lr=0.01)  # noqa: E731
    msgs = _run(tmp_path, adamw, nn.CrossEntropyLoss(), steps=11)
    per_step = [
        m.as_dict() for m in msgs if isinstance(m, p.Scalars) and "sharpness/lambda1_h" in m.names
    ]
    assert len(per_step) == 11 and all(sc["sharpness/lambda1_precond"] > 0 for sc in per_step[9:])
    for name in ("sharpness/threshold_precond", "sharpness/lambda1_precond"):
        assert all(math.isnan(sc[name]) for sc in per_step[:9])
    spectra = [m for m in msgs if isinstance(m, p.Spectrum) and m.name == "hessian-precond"]
    assert len(spectra) == 11
    warmup = [m for m in msgs if isinstance(m, p.Event) and m.code == "precond-warmup"]
    assert len(warmup) == 1 and "1/(1-β1) = 10" in warmup[0].message and warmup[0].step == 0
    sc = _scalars(msgs)
    assert math.isnan(sc["sharpness/threshold"])
    assert sc["sharpness/threshold_precond"] == pytest.approx(38 / 0.01 * (1 - 0.01 * 0.01 / 2))
    assert per_step[9]["sharpness/threshold_precond"] == pytest.approx(
        38 / 0.01 * (1 - 0.01 * 0.01 / 2)
    )
    assert sc["sharpness/lambda1_precond"] > sc["sharpness/lambda1_h"] > 0
    sp = next(m for m in msgs if isinstance(m, p.Spectrum) and m.name == "hessian-precond")
    assert sp.attrs["threshold_group"] == 0 and "AdamW" in str(sp.attrs["threshold_rule"])
    assert any(isinstance(m, p.Event) and "adaptive" in m.message for m in msgs)


def test_rmsprop_waits_for_its_squared_gradient_average(tmp_path: Path) -> None:
    """RMSprop has no bias correction: after t steps v is (1 − α^t) of its steady value, so P is
    small and λ1(P⁻¹H) inflated (a user's run: 6,186 against a threshold of 1,000 at step 0, a
    false catapult, while λ1_H rose steadily). No λ1(P⁻¹H) or threshold before t = 1/(1−α)."""
    rms = lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.8, momentum=0.5)  # noqa: E731
    msgs = _run(tmp_path, rms, nn.CrossEntropyLoss(), steps=7)
    per_step = [
        m.as_dict() for m in msgs if isinstance(m, p.Scalars) and "sharpness/lambda1_h" in m.names
    ]
    assert len(per_step) == 7
    for name in ("sharpness/threshold_precond", "sharpness/lambda1_precond"):
        assert all(math.isnan(sc[name]) for sc in per_step[:4])  # t = 1 … 4
        assert all(sc[name] > 0 for sc in per_step[4:])  # t = 5 = 1/(1−α) on
    assert per_step[4]["sharpness/threshold_precond"] == pytest.approx((2 + 2 * 0.5) / 0.01)
    warmup = [m for m in msgs if isinstance(m, p.Event) and m.code == "precond-warmup"]
    assert len(warmup) == 1 and "1/(1-α) = 5" in warmup[0].message and warmup[0].step == 0
    spectra = [m for m in msgs if isinstance(m, p.Spectrum) and m.name == "hessian-precond"]
    assert len(spectra) == 7  # still published (and warm-starting the next)


def test_param_groups_threshold_and_rule(tmp_path: Path) -> None:
    def opt(ps: Any) -> torch.optim.Optimizer:
        ps = list(ps)
        return torch.optim.SGD(
            [{"params": ps[:2], "lr": 0.01}, {"params": ps[2:], "lr": 0.1, "weight_decay": 1.0}]
        )

    msgs = _run(tmp_path, opt, nn.CrossEntropyLoss())
    assert _scalars(msgs)["sharpness/threshold"] == pytest.approx(19.0)
    sp = next(m for m in msgs if isinstance(m, p.Spectrum) and m.name == "hessian")
    assert sp.attrs["threshold_group"] == 1
    assert sp.attrs["threshold_rule"] == "2/η - wd (SGD, group 1)"


def test_sum_reduction_uses_the_batch_size_from_the_logits(tmp_path: Path) -> None:
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.0)  # noqa: E731  (the model stays put)
    mean = _scalars(_run(tmp_path, sgd, nn.CrossEntropyLoss()))["sharpness/lambda1_h"]
    summed = _run(tmp_path, sgd, nn.CrossEntropyLoss(reduction="sum"))
    assert _scalars(summed)["sharpness/lambda1_h"] == pytest.approx(12 * mean, rel=2e-2)
    given = _run(tmp_path, sgd, nn.CrossEntropyLoss(reduction="sum"), batch_size=5)
    assert _scalars(given)["sharpness/lambda1_h"] == pytest.approx(5 * mean, rel=2e-2)
    # (loss / k).backward() over k micro-batches of 3: the objective sums 3 examples, B is 3k
    micro = _run(tmp_path, sgd, nn.CrossEntropyLoss(reduction="sum"), batch_size=9, sum_over=3)
    assert _scalars(micro)["sharpness/lambda1_h"] == pytest.approx(3 * mean, rel=2e-2)
    with pytest.raises(ValueError, match="sum_over must be a positive"):
        _run(tmp_path, sgd, nn.CrossEntropyLoss(reduction="sum"), sum_over=0)


def test_sum_reduction_without_batch_size_publishes_nan_threshold() -> None:
    model = _model()
    x, y = _data()
    probe = make_probe((x, y), None, None, None, None)
    state = SharpnessState()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    msgs, _ = sharpness_messages(
        model, nn.CrossEntropyLoss(reduction="sum"), probe, 0, opt, state=state
    )
    sc = next(m for m in msgs if m.cls is p.Scalars).fields
    assert math.isnan(sc["values_raw"][1])
    ev = [m.fields for m in msgs if m.cls is p.Event]
    assert ev and ev[0]["code"] == "threshold-unknown" and "batch size" in ev[0]["message"]
    again, _ = sharpness_messages(
        model, nn.CrossEntropyLoss(reduction="sum"), probe, 1, opt, state=state
    )
    assert not [m for m in again if m.cls is p.Event]  # said once
    ref = hessian_eigen(model, x, y, nn.CrossEntropyLoss(), tol=1e-8, max_hvps=200)
    assert sc["values_raw"][0] == pytest.approx(float(ref.eigenvalues[0]), rel=2e-2)


def test_an_adaptive_optimizer_s_missing_threshold_is_said_once_with_a_short_code() -> None:
    """The event's code is a code (the reason is in the message, without a "none:" prefix)."""
    model = _model()
    x, y = _data()
    probe = make_probe((x, y), None, None, None, None)
    state = SharpnessState()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    events = []
    for step in range(2):
        msgs, _ = sharpness_messages(model, nn.CrossEntropyLoss(), probe, step, opt, state=state)
        events += [m.fields for m in msgs if m.cls is p.Event]
    codes = [e["code"] for e in events]
    assert codes.count("threshold-none") == 1 and all(":" not in c for c in codes), codes
    assert events[codes.index("threshold-none")]["message"] == (
        "no stability threshold on λ1_H: AdamW is adaptive (preconditioned steps); see λ1(P⁻¹H)"
    )


def test_probe_hygiene() -> None:
    x, y = _data()
    with pytest.raises(ValueError, match="at least one example"):
        make_probe((x[:0], y[:0]), None, None, None, None)
    with pytest.raises(ValueError, match="at least one example"):
        Agent(_model(), nn.CrossEntropyLoss(), probe=(x[:0], y[:0]), endpoint="", registry=False)
    probe = make_probe((x.double(), y), None, None, None, None, torch.float32)
    assert probe.inputs.dtype == torch.float32
    sparse = make_probe((x, y * 10 + 10), None, None, None, None)
    assert sparse.num_classes == 3 and sparse.class_names == ("10", "20", "30")
    assert torch.equal(sparse.labels, y)  # type: ignore[arg-type]
    msgs = gram_messages(nn.Linear(4, 31), nn.CrossEntropyLoss(), sparse, 0)  # logits 0..30
    mat = next(m for m in msgs if m.cls is p.Matrix)
    assert mat.fields["data"].shape == (3, 3) and mat.fields["row_labels"] == ("10", "20", "30")


def test_dict_probe_without_forward_names_forward() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    x, y = _data()
    probe = make_probe(({"a": x}, y), None, None, None, None)
    with pytest.raises(ValueError, match=r"model\(\*\*inputs\).*forward="):
        check_finite(Two(), nn.CrossEntropyLoss(), probe)
    check_finite(Two(), nn.CrossEntropyLoss(), probe, forward=lambda m, b: m(b["a"]))


def test_non_finite_weights_skip_the_measurement(tmp_path: Path) -> None:
    model = _model()
    x, y = _data()
    probe = make_probe((x, y), None, None, None, None)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(MeasurementSkipped, match="not finite"):
        check_finite(model, nn.CrossEntropyLoss(), probe)
    rec = tmp_path / "nan.stiff"
    agent = Agent(
        model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1),
        probe=(x, y), endpoint="", record=rec, gram_every=1, sharpness_every=1,
        overhead_cap=1.0, registry=False,
    )  # fmt: skip
    for _ in range(25):  # a diverged run: every due measurement skipped, said log-spaced
        agent.step(1.0)
    assert not agent.disabled
    agent.close()
    msgs, _ = read_session(rec)
    skipped = [m for m in msgs if isinstance(m, p.Event) and m.code == "measurement-skipped"]
    for kind in ("gram", "sharpness"):
        said = [m for m in skipped if m.attrs["kind"] == kind]
        assert [m.attrs["skipped"] for m in said] == [1, 2, 5, 10, 20]
        assert all(m.attrs["reason"] == "not-finite" for m in said)
        assert "because parameter 0.weight is not finite" in said[0].message
        counts = [m.as_dict() for m in msgs if isinstance(m, p.Scalars)]
        last = [c[f"coverage/{kind}/skipped"] for c in counts if f"coverage/{kind}/skipped" in c]
        assert last[-1] == 25


def test_later_grams_skip_the_probe_forward_and_still_skip_non_finite_gradients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a Gram has worked, a Gram checks only the weights before it runs (its own forward
    pass finds a non-finite loss: the gradients are not finite); the sharpness still checks the
    probe loss first. A loss that turns NaN later skips the Gram, never disables it."""
    import stiffmon_agent.runner as runner

    asked: list[tuple[bool, int]] = []
    real = runner.check_finite

    def spy(*args: Any, losses: bool = True) -> None:
        asked.append((losses, agent.step_count))
        real(*args, losses=losses)

    monkeypatch.setattr(runner, "check_finite", spy)
    nan = [False]

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per = nn.functional.cross_entropy(out, y, reduction="none")
        return per * float("nan") if nan[0] else per

    model = _model()
    x, y = _data()
    rec = tmp_path / "g.stiff"
    agent = Agent(
        model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), probe=(x, y),
        endpoint="", record=rec, gram_every=1, sharpness_every=2, overhead_cap=1.0,
        registry=False,
    )  # fmt: skip
    for s in range(6):
        nan[0] = s >= 4
        agent.step(1.0)
    assert not agent.disabled
    agent.close()
    # step 0: both check the loss (the first Gram); then a sharpness (every 2 steps, before
    # the Gram of its step) does, the Grams do not
    assert asked == [
        (True, 0), (True, 0), (False, 1), (True, 2), (False, 2), (False, 3), (True, 4),
        (False, 4), (False, 5),
    ]  # fmt: skip
    msgs, _ = read_session(rec)
    skipped = [m for m in msgs if isinstance(m, p.Event) and m.code == "measurement-skipped"]
    by_kind = {(m.attrs["kind"], m.step) for m in skipped}
    assert by_kind == {("gram", 4), ("gram", 5), ("sharpness", 4)}
    gram_said = [m.message for m in skipped if m.attrs["kind"] == "gram"]
    assert "per-example gradients are not finite" in gram_said[0]
    grams = {m.step for m in msgs if isinstance(m, p.Matrix)}
    assert grams == {0, 1, 2, 3}


@pytest.mark.parametrize("shape", [(16,), (16, 1)])
def test_binary_classifier_float_targets_get_class_stiffness(shape: tuple[int, ...]) -> None:
    """BCEWithLogitsLoss with 0/1 float targets: classes 0 and 1, each entry of the 2 × 2 class
    stiffness the mean cosine over pairs i ≠ j of per-example gradients from a naive float64
    loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    y = (torch.arange(16) % 3 == 0).double().reshape(shape)
    loss_fn = nn.BCEWithLogitsLoss()
    probe = make_probe((x, y), None, None, None, None)
    assert probe.num_classes == 2 and torch.equal(probe.labels, y.reshape(-1).long())  # type: ignore[arg-type]
    fwd = lambda m, b: m(b).reshape(b.shape[0], *shape[1:])  # noqa: E731  (logits like y)
    msgs = gram_messages(model, loss_fn, probe, 0, forward=fwd)
    mat = next(m for m in msgs if m.cls is p.Matrix)
    grads = []
    for i in range(16):
        model.zero_grad()
        loss_fn(fwd(model, x[i : i + 1]), y[i : i + 1]).backward()
        grads.append(torch.cat([q.grad.reshape(-1) for q in model.parameters()]))  # type: ignore[union-attr]
    g = torch.stack(grads)
    cos = (g @ g.T) / (g.norm(dim=1)[:, None] * g.norm(dim=1)[None, :])
    labels = y.reshape(-1).long()
    ref = torch.zeros(2, 2, dtype=torch.float64)
    for a in range(2):
        for b in range(2):
            pairs = [
                cos[i, j]
                for i in range(16)
                for j in range(16)
                if i != j and labels[i] == a and labels[j] == b
            ]
            ref[a, b] = torch.stack(pairs).mean()
    assert mat.fields["name"] == "stiffness/cos/train-train"
    assert torch.allclose(torch.as_tensor(mat.fields["data"]), ref, rtol=1e-9, atol=1e-12)


def test_soft_and_multi_label_float_targets_are_not_classes() -> None:
    x = torch.randn(6, 4)
    for y in (torch.rand(6), torch.randint(0, 2, (6, 3)).float(), torch.full((6,), 0.5)):
        assert make_probe((x, y), None, None, None, None).labels is None
