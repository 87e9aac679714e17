"""A fixed synthetic session (three learning rates) for TUI tests and snapshots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from stiffmon import protocol as p
from stiffmon.session import SessionWriter
from stiffmon.store import Store

CLASSES = tuple(str(i) for i in range(10))


def run_messages(
    lr: float, run: str, seed: int, steps: int = 600, every: int = 25
) -> list[p.Message]:
    """Messages of one synthetic run: sharpening up to 2/η (or not), stiffness decaying."""
    rng = np.random.default_rng(seed)
    out: list[p.Message] = []
    t0 = 1_000.0

    def add(cls: type[p.Message], step: int, **kw: object) -> None:
        out.append(cls(run=run, seq=len(out), step=step, t=t0 + step * 0.05, **kw))  # type: ignore[arg-type]

    add(
        p.Hello,
        0,
        name=f"sgd lr={lr}",
        host="box",
        pid=1,
        param_count=25_000,
        optimizer={"type": "SGD", "lr": lr, "momentum": 0.0},
        batch_size=64,
        class_names=CLASSES,
        probe_train=100,
        probe_val=100,
        agent_version="0.1.0",
    )
    for s in range(steps):
        loss = 2.3 * math.exp(-s * lr / 10) + 0.05 * float(rng.random())
        add(
            p.Scalars,
            s,
            names=("loss", "lr/0", "momentum/0", "accuracy", "step_time"),
            values=np.array([loss, lr, 0.0, 1 - loss / 2.5, 0.05]),
        )
        if s % every:
            continue
        lam = min(2 / lr * 1.1, 1 + s * lr * 0.8) * (1 + 0.02 * float(rng.standard_normal()))
        within = 0.5 * math.exp(-s / 400)
        names = (
            "sharpness/lambda1_h",
            "sharpness/threshold",
            "noise/trace_k",
            "noise/lambda1_k",
            "noise/conditioning",
            "noise/b_simple",
            "stiffness/cos/train-train/within",
            "stiffness/cos/train-train/between",
            "stiffness/cos/train-val/within",
            "xi/input",
        )
        vals = (
            lam,
            2 / lr,
            5 * math.exp(-s / 300) / lr**0.3,
            2 * math.exp(-s / 300),
            0.2,
            30 + s / 10,
            within,
            -0.05,
            within * math.exp(-s / 300),
            0.9 - s / 2000,
        )
        add(p.Scalars, s, names=names, values=np.array(vals))
        m = rng.uniform(-0.3, 0.3, (10, 10)) + np.eye(10) * 0.6 * math.exp(-s / 400)
        for kind in ("cos", "sign"):
            data = m if kind == "cos" else np.sign(m) * 0.8
            for blk in ("train-train", "train-val", "val-val"):
                add(
                    p.Matrix,
                    s,
                    name=f"stiffness/{kind}/{blk}",
                    data=data,
                    row_labels=CLASSES,
                    col_labels=CLASSES,
                    attrs={"within": float(np.mean(np.diag(data))), "between": -0.05},
                )
        x = np.linspace(0.05, 1.95, 20)
        add(
            p.Curve,
            s,
            name="stiffness-distance/input",
            x=x,
            y=0.6 * np.exp(-x * 2) - 0.1,
            attrs={"xi": math.log(6) / 2},
        )
        layers = {f"layer-stiffness/{n}": within * k for k, n in enumerate(("conv1", "fc1", "fc2"))}
        add(p.Scalars, s, names=tuple(layers), values=np.array(list(layers.values())))
        add(p.Spectrum, s, name="hessian", values=np.array([lam, lam / 2]), attrs={"hvps": 5})
        add(p.Spectrum, s, name="grad-cov", values=np.geomspace(2.0, 0.01, 8) * math.exp(-s / 300))
        add(p.Scalars, s, names=("custom/val_loss",), values=np.array([loss * 1.1]))
    add(p.Bye, steps - 1, reason="closed")
    return out


def write_sessions(directory: Path, lrs: tuple[float, ...] = (0.01, 0.05, 0.2)) -> list[Path]:
    paths = []
    for i, lr in enumerate(lrs):
        path = directory / f"lr{lr}.stiff"
        with SessionWriter(path) as w:
            for m in run_messages(lr, f"run{i}", i):
                w.write(m)
        paths.append(path)
    return paths


def troubled_store() -> Store:
    """Three live runs at monitor time 20: one diverged, one lost a metric and skips
    measurements, one stalled since time 5."""
    store = Store()
    for i, (name, seen) in enumerate((("diverged", 20.0), ("no gram", 20.0), ("stalls", 5.0))):
        run = f"r{i}"
        msgs = [m for m in run_messages(0.05 * (i + 1), run, i, steps=120) if m.KIND != "bye"]
        for m in msgs:
            store.apply(m, now=seen)
        rd = store.runs[run]
        rd.hello = p.Hello(run=run, seq=0, step=0, t=0.0, name=name)

    def event(run: str, step: int, code: str, level: str, msg: str, **attrs: object) -> None:
        store.apply(
            p.Event(
                run=run,
                seq=9999,
                step=step,
                t=1000.0 + step * 0.05,
                level=level,
                code=code,
                message=msg,
                attrs=attrs,
            ),  # type: ignore[arg-type]
            now=20.0,
        )

    store.apply(
        p.Scalars(
            run="r0", seq=9998, step=119, t=1006.0, names=("loss",), values=np.array([math.nan])
        ),
        now=20.0,
    )
    event("r0", 119, "nan-loss", "warning", "loss is nan at step 119")
    event(
        "r1", 60, "metric-error", "error", "gram failed: RuntimeError: out of memory", metric="gram"
    )
    event(
        "r1",
        60,
        "metric-disabled",
        "warning",
        "gram disabled for the rest of the run",
        metric="gram",
    )
    for s in (30, 40, 55, 90):
        event(
            "r1",
            s,
            "measurement-skipped",
            "info",
            "sharpness skipped (overhead cap)",
            kind="sharpness",
            reason="overhead",
        )
    return store
