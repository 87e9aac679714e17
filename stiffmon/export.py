"""``stiffmon export``: session files or live runs to CSV, Parquet or TensorBoard event files.

Layout of ``--format csv`` / ``--format parquet`` (one file per table in ``--out DIR``; ``run`` is
the run id, the join key of every table):

* ``scalars``: ``run, step, time, name, value`` — every per-step scalar (loss, lr/0, …) and every
  heavy scalar (``sharpness/lambda1_h``, ``noise/trace_k``, ``stiffness/cos/train-train/within``,
  ``xi/input`` …), tidy long form, one row per (run, step, name), nothing thinned;
* ``runs``: ``run, name, host, pid, optimizer, lr, momentum, batch_size, param_count,
  probe_train, probe_val, class_names, agent_version, status`` (``optimizer`` and
  ``class_names`` as JSON text; ``lr`` and ``momentum`` those of param group 0 at the last
  step, the hello's without per-step values; ``status`` in the monitor's words: ``finished``,
  ``no bye (crashed?)`` …, see :func:`stiffmon.summary.run_status`);
* ``matrices``: ``run, step, time, name, row, col, row_label, col_label, value, attrs`` — one row
  per cell of every measurement of every matrix (class stiffness blocks);
* ``curves``: ``run, step, time, name, index, x, y, attrs`` — stiffness-vs-distance curves, one
  row per bin (x: bin centre, y: mean stiffness; the curve's ξ is the ``xi/<space>`` scalar);
* ``spectra``: ``run, step, time, name, rank, value, attrs`` — eigenvalues, rank 0 the largest;
* ``events``: ``run, step, time, level, code, message, attrs``.

``attrs`` is the measurement's (or event's) attributes as JSON text, the same on each of its
rows (keys sorted): for the ``hessian`` spectrum ``threshold_rule``,
``threshold_group`` (the param group that set the threshold, −1 if none), ``converged``,
``hvps`` and ``objective``; ``n`` for ``grad-cov``; ``xi`` and ``pairs`` for a curve; ``within``
and ``between`` for a class-stiffness matrix; e.g. ``metric`` for an event.

``time`` is Unix time in seconds. Missing values (NaN) are empty cells in CSV and nulls in Parquet.

An earlier export is never replaced silently: :func:`export` refuses (and writes nothing) when a
file it would write exists (:func:`existing_outputs`), unless ``force`` (``--force``).

``--format tensorboard`` writes one directory per run (``<name>`` or ``<name>-<run id>`` if
names repeat) with one event file holding every scalar under its own name as tag, each matrix
measurement as a heatmap image (tag = matrix name; blue −1 … white 0 … red +1 for stiffness,
else scaled by the largest magnitude; grey for NaN) and each spectrum measurement as a histogram
(tag ``spectrum/<name>``). Event files are written with TensorBoard's own event-file writer and
protobufs, so neither TensorFlow nor torch is imported.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from stiffmon.export_tables import SCHEMAS, Columns, coalesced, tables
from stiffmon.store import Store

FORMATS = ("csv", "parquet", "tensorboard")

__all__ = ["FORMATS", "SCHEMAS", "Columns", "ExportError", "export", "load", "tables"]


class ExportError(Exception):
    """An export that cannot be done (missing optional package, nothing to export)."""


def _cell(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return v


def _as_list(values: list[Any] | npt.NDArray[Any]) -> list[Any]:
    return values.tolist() if isinstance(values, np.ndarray) else values


def write_csv(store: Store, out: Path) -> list[Path]:
    """Write one ``<table>.csv`` per table into ``out``, streamed chunk by chunk; return the
    paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, cols in SCHEMAS.items():
        path = out / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for chunk in coalesced(store, name, rows=1 << 14):
                lists = [_as_list(chunk[c]) for c in cols]
                w.writerows([_cell(v) for v in row] for row in zip(*lists, strict=True))
                del lists, chunk  # hold one chunk at a time, not this one while making the next
        paths.append(path)
    return paths


def write_parquet(store: Store, out: Path) -> list[Path]:
    """Write one ``<table>.parquet`` per table into ``out`` (needs ``pyarrow``)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ExportError('parquet export needs pyarrow: pip install "stiffmon[export]"') from exc
    types = {
        "run": pa.string(),
        "step": pa.int64(),
        "time": pa.float64(),
        "name": pa.string(),
        "value": pa.float64(),
        "row": pa.int64(),
        "col": pa.int64(),
        "index": pa.int64(),
        "rank": pa.int64(),
        "x": pa.float64(),
        "y": pa.float64(),
        "lr": pa.float64(),
        "momentum": pa.float64(),
        "pid": pa.int64(),
        "batch_size": pa.int64(),
        "param_count": pa.int64(),
        "probe_train": pa.int64(),
        "probe_val": pa.int64(),
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, cols in SCHEMAS.items():
        schema = pa.schema([(c, types.get(c, pa.string())) for c in cols])
        path = out / f"{name}.parquet"
        with pq.ParquetWriter(path, schema) as writer:
            for chunk in coalesced(store, name):
                arrays = []
                for c in cols:
                    typ = types.get(c, pa.string())
                    values = chunk[c]
                    if typ == pa.float64():
                        values = np.asarray(values, dtype=np.float64)
                        arr = pa.array(values, type=typ, from_pandas=True)
                    elif isinstance(values, np.ndarray) and values.dtype != object:
                        arr = pa.array(values, type=typ)
                    else:
                        arr = pa.array(list(values), type=typ)
                    arrays.append(arr)
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------- sources


def load(
    files: Iterable[Path],
    endpoints: Sequence[Any] = (),
    *,
    wait: float = 2.0,
    curve: Any = None,
    notes: list[str] | None = None,
    unopened: list[str] | None = None,
) -> Store:
    """Read session files and listen to live endpoints for ``wait`` seconds; nothing thinned.

    Files are merged (:func:`stiffmon.session.read_sessions`): a message of a run found in
    several files is kept once. What was skipped (damaged records, torn tails, invalid records, a
    newer protocol version) is appended to ``notes`` in words. With ``unopened`` given, a file
    that is not a session (empty, cut before its header, foreign, unreadable) is left out, the
    others read, and ``<file> not opened: <why>`` appended to it; without, it raises.

    Raises:
        stiffmon.session.SessionError: Without ``unopened``, a file that is not a session.
    """
    from stiffmon.session import read_sessions

    store = Store(max_points=2**62)
    msgs, merge = read_sessions(list(files), skip_unopened=unopened is not None)
    store.extend(msgs, replay=True)
    if unopened is not None:
        unopened += merge.unopened_notes()
    if notes is not None:
        notes += merge.notes(unopened=False)
        for report in merge.reports.values():
            if not report.runs and not report.newer_version:
                notes.append(f"{report.path}: holds no run")
        if store.rejected:
            notes.append(f"{store.rejected} messages could not be stored (malformed)")
    if endpoints:
        from stiffmon.client import Client

        with Client(list(endpoints), curve=curve) as client:
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                for msg, _ in client.poll(0.1):
                    store.apply(msg)
    return store


def check_out(out: Path, fmt: str | None = None, *, force: bool = False) -> None:
    """Refuse an output path that exists and is not a directory (it is left untouched), and,
    for ``fmt`` csv or parquet without ``force``, one that holds a table this export writes (their
    names do not depend on the runs: this can be asked before listening to endpoints).

    Raises:
        ExportError: ``out`` is not a directory, or holds a table file of ``fmt`` already.
    """
    if out.exists() and not out.is_dir():
        raise ExportError(
            f"--out {out} exists and is not a directory: give a directory to write into "
            "(it is made if missing)"
        )
    if not force:
        refuse_existing(existing_outputs(None, fmt or "", out), out)


TABLE_SUFFIX = {"csv": ".csv", "parquet": ".parquet"}


def existing_outputs(store: Store | None, fmt: str, out: Path) -> list[Path]:
    """The files in ``out`` that an export of ``store`` in ``fmt`` would replace or add to.

    The table files (csv, parquet); for tensorboard (with a ``store``: the directories are named
    after its runs), the event files already in the run directories it writes into: one more
    there would show the run twice in TensorBoard.
    """
    if fmt in TABLE_SUFFIX:
        paths = [out / f"{name}{TABLE_SUFFIX[fmt]}" for name in SCHEMAS]
        return [path for path in paths if path.exists() or path.is_symlink()]
    found: list[Path] = []
    if fmt == "tensorboard" and store is not None:
        from stiffmon.export_tensorboard import run_dirs

        for logdir in (out / name for name in run_dirs(store).values()):
            found += sorted(logdir.glob("events.out.tfevents.*")) if logdir.is_dir() else []
    return found


def refuse_existing(existing: Sequence[Path], out: Path) -> None:
    """Raise :class:`ExportError` naming the first of ``existing`` (files an export would
    replace), if any."""
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ExportError(
            f"{existing[0]}{more} already exists in --out {out} (an earlier export?); nothing "
            "was written: give another --out, or --force to replace it"
        )


def export(store: Store, fmt: str, out: Path, *, force: bool = False) -> list[Path]:
    """Export ``store`` in format ``fmt`` (csv, parquet or tensorboard) into ``out``.

    Without ``force`` nothing is written if any file the export would write exists already
    (:func:`existing_outputs`); with it, table files are replaced, and the earlier event files
    in the run directories that tensorboard writes into are removed first.

    Raises:
        ExportError: ``out`` is not a directory, holds an earlier export (without ``force``), or
            the format's package is missing.
        OSError: ``out`` cannot be made or written.
    """
    check_out(out)
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    existing = existing_outputs(store, fmt, out)
    if not force:
        refuse_existing(existing, out)
    if fmt == "csv":
        return write_csv(store, out)
    if fmt == "parquet":
        return write_parquet(store, out)
    from stiffmon.export_tensorboard import write_tensorboard

    return write_tensorboard(store, out, replace=existing)  # force: the earlier event files
