"""The summary table fits 80 columns without cutting words (``summary``, ``demo --no-tui``)."""

from __future__ import annotations

from rich.console import Console

from stiffmon import protocol as p
from stiffmon.store import Store
from stiffmon.summary import run_summary, summary_table


def test_summary_table_fits_80_columns_without_cutting_words() -> None:
    store = Store()
    for i, (lr, loss) in enumerate([(0.01, 1.234e-05), (0.05, 0.0317), (0.2, 2.17)]):
        run = f"r{i}"
        store.apply(
            p.Hello(
                run=run,
                seq=0,
                step=0,
                t=0.0,
                name=f"sgd lr={lr:g} momentum 0.9",
                optimizer={"lr": lr, "momentum": 0.9},
                batch_size=1797,
            ),
            replay=True,
        )
        store.apply(
            p.Scalars.from_dict(
                {
                    "loss": loss,
                    "sharpness/lambda1_h": 123.456,
                    "sharpness/threshold": 2 / lr,
                    "noise/lambda1_k": 25.0,
                    "xi/input": 0.87,
                },
                run=run,
                seq=1,
                step=29_999,
                t=1.0,
            ),
            replay=True,
        )
        store.apply(p.Bye(run=run, seq=2, step=29_999, t=2.0, reason="closed"), replay=True)
    console = Console(width=80, record=True, color_system=None)
    console.print(summary_table(store))
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in text
    words = text.split()
    for word in ("steps", "loss", "break", "even", "peak", "λ1_H", "bound", "λ1_K", "status"):
        assert word in words
    for value in ("30000", "1.23e-05", "0.0317", "2.17", "1797", "123", "200", "0.87"):
        assert value in words, value
    assert words.count("finished") == 3
    assert "stability threshold of λ1_H" in text and "early-phase peak" in text


def test_batch_size_from_the_per_step_scalar() -> None:
    store = Store()
    store.apply(p.Hello(run="r", seq=0, step=0, t=0.0, optimizer={"lr": 0.1}), replay=True)
    store.apply(
        p.Scalars.from_dict({"loss": 1.0, "batch_size": 50.0}, run="r", seq=1, step=0, t=0.0),
        replay=True,
    )
    store.apply(  # the last, smaller batch of an epoch
        p.Scalars.from_dict({"loss": 1.0, "batch_size": 7.0}, run="r", seq=2, step=1, t=0.0),
        replay=True,
    )
    row = run_summary(store.runs["r"])
    assert row["batch_size"] == 50 and row["lr_over_batch"] == 0.1 / 50
    store.apply(p.Hello(run="q", seq=0, step=0, t=0.0, batch_size=32), replay=True)
    store.apply(
        p.Scalars.from_dict({"loss": 1.0, "batch_size": 50.0}, run="q", seq=1, step=0, t=0.0),
        replay=True,
    )
    assert run_summary(store.runs["q"])["batch_size"] == 32  # the hello's, when given
