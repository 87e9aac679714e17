"""Export of 1000-class stiffness matrices (ImageNet's 1000 classes: a million rows per
matrix): every cell, in row-major order, its class names and NaN for classes without pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stiffmon import protocol as p
from stiffmon.export import load, tables
from stiffmon.session import SessionWriter

K = 1000


def test_a_1000_class_matrix_table_is_cell_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.uniform(-1, 1, (K, K))
    data[rng.uniform(size=(K, K)) < 0.8] = np.nan  # classes without probe examples
    names = tuple(f"n{i:08d}" for i in range(K))
    path = tmp_path / "k.stiff"
    with SessionWriter(path) as w:
        w.write(p.Hello(run="r", seq=0, step=0, t=1.0, name="k", class_names=names))
        for step in (0, 1):
            w.write(
                p.Matrix(run="r", seq=1 + step, step=step, t=2.0 + step,
                         name="stiffness/cos/train-train", data=data + step,
                         row_labels=names, col_labels=names, attrs={"within": 0.5})
            )  # fmt: skip
    store = load([path])
    m = tables(store)["matrices"]
    assert len(m["value"]) == 2 * K * K
    i = K * K + 123 * K + 456  # step 1, row 123, col 456
    assert (int(m["step"][i]), int(m["row"][i]), int(m["col"][i])) == (1, 123, 456)
    assert (m["row_label"][i], m["col_label"][i]) == (names[123], names[456])
    assert np.array_equal(np.asarray(m["value"][: K * K], float), data.reshape(-1), equal_nan=True)
    assert m["attrs"][i] == '{"within": 0.5}'
