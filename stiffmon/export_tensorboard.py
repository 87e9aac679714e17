"""TensorBoard event files for ``stiffmon export --format tensorboard``.

The layout is described in :mod:`stiffmon.export`. Written with TensorBoard's own event-file
writer and protobufs (``pip install "stiffmon[export]"``), so neither TensorFlow nor torch is
imported; images are PNG-encoded here with zlib.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from stiffmon.export import ExportError
from stiffmon.store import Store


def png(rgb: npt.NDArray[np.uint8]) -> bytes:
    """Encode an (H, W, 3) uint8 image as PNG (zlib, no dependency)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + tag
            + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def heatmap(data: npt.ArrayLike, cell: int = 16) -> npt.NDArray[np.uint8]:
    """A matrix as an RGB heatmap, ``cell`` pixels per entry.

    Diverging map: −1 blue (33, 102, 172), 0 white, +1 red (178, 24, 43), linear in between;
    values outside [−1, 1] are scaled by the largest magnitude; NaN is grey.
    """
    a = np.asarray(data, dtype=np.float64)
    finite = np.isfinite(a)
    peak = float(np.abs(a[finite]).max()) if finite.any() else 1.0
    v = a / peak if peak > 1.0 else a
    v = np.clip(np.where(finite, v, 0.0), -1.0, 1.0)[..., None]
    white = np.array([255.0, 255.0, 255.0])
    red = np.array([178.0, 24.0, 43.0])
    blue = np.array([33.0, 102.0, 172.0])
    rgb = np.where(v >= 0, white + v * (red - white), white - v * (blue - white))
    rgb[~finite] = (128.0, 128.0, 128.0)
    img = np.round(rgb).astype(np.uint8)
    return np.repeat(np.repeat(img, cell, axis=0), cell, axis=1)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9=.,+-]+", "_", name).strip("_") or "run"


def run_dirs(store: Store) -> dict[str, str]:
    """Directory name per run id: the run's name, with the run id appended where names repeat."""
    names = {rid: _slug(rd.name) for rid, rd in store.runs.items()}
    counts: dict[str, int] = {}
    for n in names.values():
        counts[n] = counts.get(n, 0) + 1
    return {rid: n if counts[n] == 1 else f"{n}-{_slug(rid)}" for rid, n in names.items()}


def write_tensorboard(store: Store, out: Path, replace: Sequence[Path] = ()) -> list[Path]:
    """Write one TensorBoard event file per run under ``out/<run>/`` (needs ``tensorboard``).

    Args:
        store: The runs.
        out: The directory the run directories go into.
        replace: Earlier event files to remove first (once ``tensorboard`` is known to import:
            a missing package loses nothing).
    """
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError as exc:
        raise ExportError(
            'tensorboard export needs tensorboard: pip install "stiffmon[export]"'
        ) from exc
    for path in replace:
        path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    dirs = run_dirs(store)
    paths = []
    for rid, rd in store.runs.items():
        logdir = out / dirs[rid]
        writer = EventFileWriter(str(logdir), max_queue_size=1000, flush_secs=3600)

        def emit(step: int, when: float, value: Any) -> None:
            writer.add_event(  # noqa: B023 (used within this iteration only)
                event_pb2.Event(
                    wall_time=when, step=step, summary=summary_pb2.Summary(value=[value])
                )
            )

        events: list[tuple[int, float, Any]] = []
        for name, s in rd.scalars.items():
            for step, when, v in zip(
                s.steps.tolist(), s.times.tolist(), s.values.tolist(), strict=True
            ):
                events.append((step, when, summary_pb2.Summary.Value(tag=name, simple_value=v)))
        for name, snaps in rd.matrices.items():
            for snap in snaps:
                img = heatmap(snap.msg.data)  # type: ignore[union-attr]
                image = summary_pb2.Summary.Image(
                    height=img.shape[0],
                    width=img.shape[1],
                    colorspace=3,
                    encoded_image_string=png(img),
                )
                events.append((snap.step, snap.t, summary_pb2.Summary.Value(tag=name, image=image)))
        for name, snaps in rd.spectra.items():
            for snap in snaps:
                hist = histogram(snap.msg.values, summary_pb2.HistogramProto)  # type: ignore[union-attr]
                events.append(
                    (
                        snap.step,
                        snap.t,
                        summary_pb2.Summary.Value(tag=f"spectrum/{name}", histo=hist),
                    )
                )
        events.sort(key=lambda e: (e[0], e[1]))
        for step, when, value in events:
            emit(step, when, value)
        writer.close()
        paths.append(logdir)
    return paths


def histogram(values: npt.ArrayLike, proto: Any, bins: int = 30) -> Any:
    """A ``HistogramProto`` of ``values`` (NaN / inf dropped; ``bins`` equal-width buckets)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return proto(min=0.0, max=0.0, num=0, sum=0.0, sum_squares=0.0)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo + max(abs(lo) * 1e-6, 1e-12)
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    return proto(
        min=lo,
        max=float(v.max()),
        num=float(v.size),
        sum=float(v.sum()),
        sum_squares=float((v * v).sum()),
        bucket_limit=edges[1:].tolist(),
        bucket=counts.astype(np.float64).tolist(),
    )
