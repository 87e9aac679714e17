"""The tidy tables of ``stiffmon export``, produced in chunks so that no table is held whole.

:func:`table_chunks` yields one table's rows as column chunks (``{column: values}``), run by
run, measurement by measurement: a matrix measurement of ``r x c`` cells is ``r*c`` rows built
with NumPy (``row = repeat(arange(r), c)``, ``col = tile(arange(c), r)``, ``value =
data.ravel()`` in C order), never one Python object per cell held for the whole table.
:func:`coalesced` joins small chunks into chunks of at least ``rows`` rows (Parquet row groups).
Writers stream these chunks to disk, so an export's memory is the store plus one chunk, not the
store plus every table as Python lists (an 80M-cell matrix table was ~20 GB that way).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from stiffmon.store import RunData, Store
from stiffmon.summary import run_status

Columns = dict[str, list[Any] | npt.NDArray[Any]]

SCHEMAS: dict[str, tuple[str, ...]] = {
    "scalars": ("run", "step", "time", "name", "value"),
    "runs": (
        "run",
        "name",
        "host",
        "pid",
        "optimizer",
        "lr",
        "momentum",
        "batch_size",
        "param_count",
        "probe_train",
        "probe_val",
        "class_names",
        "agent_version",
        "status",
    ),
    "matrices": (
        "run",
        "step",
        "time",
        "name",
        "row",
        "col",
        "row_label",
        "col_label",
        "value",
        "attrs",
    ),
    "curves": ("run", "step", "time", "name", "index", "x", "y", "attrs"),
    "spectra": ("run", "step", "time", "name", "rank", "value", "attrs"),
    "events": ("run", "step", "time", "level", "code", "message", "attrs"),
}

CHUNK_ROWS = 1 << 18


def attrs_json(msg: Any) -> str:
    """A message's ``attrs`` (JSON scalars, finite: the protocol checks) as JSON text, keys
    sorted."""
    return json.dumps(dict(getattr(msg, "attrs", None) or {}), sort_keys=True, default=str)


def _full(n: int, value: Any) -> npt.NDArray[Any]:
    return np.full(n, value, dtype=object)


def _head(n: int, run: str, step: int, when: float, name: str) -> Columns:
    """The ``run, step, time, name`` columns of ``n`` rows of one measurement."""
    return {
        "run": _full(n, run),
        "step": np.full(n, step, dtype=np.int64),
        "time": np.full(n, when, dtype=np.float64),
        "name": _full(n, name),
    }


def _run_row(rd: RunData) -> Columns:
    h = rd.hello
    row: dict[str, Any] = {
        "run": rd.run,
        "name": rd.name,
        "host": h.host if h else "",
        "pid": h.pid if h else None,
        "optimizer": json.dumps(rd.optimizer, sort_keys=True),
        "lr": rd.lr,
        "momentum": rd.momentum,
        "batch_size": rd.batch_size,
        "param_count": h.param_count if h else None,
        "probe_train": h.probe_train if h else None,
        "probe_val": h.probe_val if h else None,
        "class_names": json.dumps(list(h.class_names) if h else []),
        "agent_version": h.agent_version if h else "",
        "status": run_status(rd),
    }
    return {k: [v] for k, v in row.items()}


def _labels(labels: tuple[str, ...], n: int) -> npt.NDArray[Any]:
    return np.asarray([labels[i] if i < len(labels) else "" for i in range(n)], dtype=object)


def _run_chunks(rd: RunData, table: str) -> Iterator[Columns]:
    """One run's rows of ``table``, a chunk per series or measurement."""
    if table == "scalars":
        for name, s in sorted(rd.scalars.items()):  # by name: independent of arrival order
            steps, times, values = s.steps, s.times, s.values
            for a in range(0, len(s), CHUNK_ROWS):  # a 5M-step series in slices
                b = min(len(s), a + CHUNK_ROWS)
                yield {
                    "run": _full(b - a, rd.run),
                    "step": np.array(steps[a:b], dtype=np.int64),
                    "time": np.array(times[a:b], dtype=np.float64),
                    "name": _full(b - a, name),
                    "value": np.array(values[a:b], dtype=np.float64),
                }
    elif table == "runs":
        yield _run_row(rd)
    elif table == "matrices":
        for name, snaps in rd.matrices.items():
            for snap in snaps:
                mat: Any = snap.msg
                data = np.asarray(mat.data, dtype=np.float64)
                r, c = data.shape
                rows, cols = np.repeat(np.arange(r), c), np.tile(np.arange(c), r)
                chunk = _head(r * c, rd.run, snap.step, snap.t, name)
                chunk["row"], chunk["col"] = rows, cols
                chunk["row_label"] = _labels(mat.row_labels, r)[rows]
                chunk["col_label"] = _labels(mat.col_labels, c)[cols]
                chunk["value"] = data.ravel()
                chunk["attrs"] = _full(r * c, attrs_json(mat))
                yield chunk
    elif table == "curves":
        for name, snaps in rd.curves.items():
            for snap in snaps:
                cur: Any = snap.msg
                n = len(cur.x)
                if len(cur.y) != n:
                    raise ValueError(f"curve {name} at step {snap.step}: x and y differ in length")
                chunk = _head(n, rd.run, snap.step, snap.t, name)
                chunk["index"] = np.arange(n)
                chunk["x"] = np.asarray(cur.x, dtype=np.float64)
                chunk["y"] = np.asarray(cur.y, dtype=np.float64)
                chunk["attrs"] = _full(n, attrs_json(cur))
                yield chunk
    elif table == "spectra":
        for name, snaps in rd.spectra.items():
            for snap in snaps:
                sp: Any = snap.msg
                n = len(sp.values)
                chunk = _head(n, rd.run, snap.step, snap.t, name)
                chunk["rank"] = np.arange(n)
                chunk["value"] = np.asarray(sp.values, dtype=np.float64)
                chunk["attrs"] = _full(n, attrs_json(sp))
                yield chunk
    elif table == "events":
        if rd.events:
            yield {
                "run": [rd.run] * len(rd.events),
                "step": [e.step for e in rd.events],
                "time": [e.t for e in rd.events],
                "level": [e.level for e in rd.events],
                "code": [e.code for e in rd.events],
                "message": [e.message for e in rd.events],
                "attrs": [attrs_json(e) for e in rd.events],
            }
    else:
        raise KeyError(table)


def table_chunks(store: Store, table: str) -> Iterator[Columns]:
    """The rows of ``table`` (a key of :data:`SCHEMAS`), run by run, as column chunks."""
    for rd in store.runs.values():
        yield from _run_chunks(rd, table)


def _concat(chunks: list[Columns], cols: tuple[str, ...]) -> Columns:
    out: Columns = {}
    for c in cols:
        parts = [
            np.asarray(ch[c], dtype=object) if isinstance(ch[c], list) else ch[c] for ch in chunks
        ]
        out[c] = np.concatenate(parts)
    return out


def coalesced(store: Store, table: str, rows: int = CHUNK_ROWS) -> Iterator[Columns]:
    """:func:`table_chunks` joined into chunks of at least ``rows`` rows (the last may be
    smaller); always at least one chunk, empty for an empty table."""
    cols = SCHEMAS[table]
    pending: list[Columns] = []
    n = 0
    sent = False
    for chunk in table_chunks(store, table):
        pending.append(chunk)
        n += len(chunk[cols[0]])
        if n >= rows:
            yield _concat(pending, cols) if len(pending) > 1 else pending[0]
            pending, n, sent = [], 0, True
    if pending:
        yield _concat(pending, cols) if len(pending) > 1 else pending[0]
    elif not sent:
        yield {c: [] for c in cols}


def tables(store: Store) -> dict[str, Columns]:
    """The store as whole tidy tables (column name → values), in memory: for small stores and
    tests; :func:`coalesced` streams them."""
    return {name: next(coalesced(store, name, rows=2**62)) for name in SCHEMAS}
