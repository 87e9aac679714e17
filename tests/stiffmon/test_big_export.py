"""A big export streams its tables: memory is one chunk, not every table as Python lists.

A week-long run's file (5M steps, 4,000 measurements of two 100x100 class matrices: 80M matrix
cells) made ``stiffmon export --format csv`` grow to 21 GB and run past 8 minutes before it: every
table was built whole as lists of Python objects before the first row was written. Here the
scaling is tested small: exporting 3x the matrix cells must not take more traced Python memory,
and the rows must equal a brute-force loop over the recorded matrices, bit for bit.
"""

from __future__ import annotations

import csv
import tracemalloc
from pathlib import Path

import numpy as np

from stiffmon import protocol as p
from stiffmon.export import load, write_csv
from stiffmon.export_tables import SCHEMAS, coalesced
from stiffmon.session import SessionWriter

C = 20
N_MEAS = 60


def _data(m: int) -> np.ndarray:
    return np.sin(np.arange(C * C, dtype=np.float64).reshape(C, C) * 0.37 + m) / 3.0


def _write(path: Path, n_meas: int = N_MEAS) -> None:
    labels = tuple(f"c{i}" for i in range(C))
    with SessionWriter(path) as w:
        w.write(p.Hello(run="r", seq=0, step=0, t=1.0, name="big", class_names=labels))
        steps = np.arange(1000, dtype=np.int64)
        w.write(
            p.Columns.from_columns(
                {"loss": np.exp(-steps / 300.0)}, steps, 1.0 + steps * 0.25, run="r", seq=1
            )
        )
        for m in range(n_meas):
            w.write(p.Matrix(run="r", seq=2 + m, step=m * 3, t=1.0 + m, name="stiffness/cos/x",
                             data=_data(m), row_labels=labels, col_labels=labels))  # fmt: skip
        w.write(p.Bye(run="r", seq=2 + n_meas, step=999, t=300.0, reason="closed"))


def _csv_peak(tmp_path: Path, n_meas: int) -> int:
    """Peak traced Python memory of ``write_csv`` on a store of ``n_meas`` matrices."""
    _write(tmp_path / f"{n_meas}.stiff", n_meas)
    store = load([tmp_path / f"{n_meas}.stiff"])
    tracemalloc.start()
    try:
        write_csv(store, tmp_path / f"out{n_meas}")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_csv_export_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    small, big = _csv_peak(tmp_path, N_MEAS), _csv_peak(tmp_path, 3 * N_MEAS)
    assert big < 1.3 * small + 1e6, (
        f"{3 * N_MEAS * C * C} cells peaked at {big / 1e6:.1f} MB, "
        f"{N_MEAS * C * C} at {small / 1e6:.1f} MB: the tables are held whole"
    )


def test_csv_matrices_equal_a_brute_force_loop(tmp_path: Path) -> None:
    _write(tmp_path / "s.stiff")
    write_csv(load([tmp_path / "s.stiff"]), tmp_path / "out")
    cells = N_MEAS * C * C
    with (tmp_path / "out" / "matrices.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == SCHEMAS["matrices"]
    # brute-force reference: one row per cell, C order
    k = 1
    for m in range(N_MEAS):
        data = _data(m)
        for i in range(C):
            for j in range(C):
                row = rows[k]
                k += 1
                assert row[1:6] == [str(m * 3), repr(1.0 + m), "stiffness/cos/x", str(i), str(j)]
                assert row[6] == f"c{i}" and row[7] == f"c{j}"
                assert float(row[8]) == data[i, j]  # bit for bit (repr round-trips)
    assert k == len(rows) == cells + 1
    with (tmp_path / "out" / "scalars.csv").open(newline="") as f:
        loss = [r for r in csv.reader(f) if r[3] == "loss"]
    assert [float(r[4]) for r in loss] == [float(np.exp(-s / 300.0)) for s in range(1000)]


def test_chunks_are_bounded(tmp_path: Path) -> None:
    _write(tmp_path / "s.stiff")
    store = load([tmp_path / "s.stiff"])
    sizes = [len(c["value"]) for c in coalesced(store, "matrices", rows=50_000)]
    assert sum(sizes) == N_MEAS * C * C
    assert max(sizes) < 50_000 + C * C  # one measurement past the bound at most
    assert [len(c["run"]) for c in coalesced(store, "events")] == [0]  # an empty table: one chunk
