"""Read a batch's GPU values on the publisher thread without making training wait.

A blocking read of a CUDA tensor (``.cpu()``, ``.item()``, ``.tolist()``) waits until the GPU
has run everything queued before it. On the publisher thread that wait looks harmless, but it
is not: measured on an H100, a pageable device-to-host copy waiting behind 0.1 s of queued work
held up the training thread's next kernel launch for most of that time, and a CNN loop publishing
every step's loss and accuracy ran 1.10× the time without the agent. So the values of a batch
are read like this instead:

* The values are stacked and converted on the *training* stream (remembered when the batch was
  started, :func:`cuda_stream_of`), so they are read after the steps that made them, whichever
  stream the loop uses.
* A non-blocking copy goes into pinned host memory, followed by an event on that stream. The
  pinned buffer is allocated once per reading thread and reused (:data:`PINNED_MIN` values):
  ``cudaHostAlloc`` itself waits for the GPU and held up the training thread's launches like a
  blocking read, so a fresh pinned tensor per batch (or one kept alive by the message holding a
  view of it) would bring the stall back.
* The publisher thread polls the event (``query()``, which never blocks), sleeping between polls
  for longer each time (:data:`POLL_FIRST` doubling up to :data:`POLL_MAX`).

No synchronising call is made here: on the H100, with 0.1 s of work queued, the training thread's
launches went on (≤ 0.2 ms each) while a loss was read this way. The price is a few kernels on
the training stream per batch (~every 0.1 s). The GPU hit count of ``step(loss, logits,
targets)`` (:mod:`~stiffmon_agent.accuracy`) still held the training thread up there; that stall
is open (the strict ``xfail`` in ``tests/agent/metrics/test_cuda.py``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

POLL_FIRST = 0.0002
POLL_MAX = 0.005
"""Seconds between polls of the copy's event: doubling from the first to the longest (each poll
takes the GIL from the training thread; a batch's values may wait behind a long GPU queue)."""

PINNED_MIN = 8192  # float64 values: a whole batch (``columns.DEFAULT_MAX_ROWS``) in one buffer
_PINNED = threading.local()


def cuda_stream_of(values: Sequence[Any]) -> Any:
    """The current stream of the device of the first CUDA tensor among ``values`` (tensors or
    objects with a ``hits`` tensor), else None. Called on the training thread once per batch."""
    for v in values:
        t = v if isinstance(v, Tensor) else getattr(v, "hits", None)
        if isinstance(t, Tensor) and t.is_cuda:
            return torch.cuda.current_stream(t.device)
    return None


def stacked_float64(tensors: Sequence[Tensor], stream: Any = None) -> npt.NDArray[np.float64]:
    """``torch.stack(tensors)`` flattened to float64 numpy, read without blocking for CUDA.

    Args:
        tensors: Tensors of one shape, all on one device.
        stream: The CUDA stream that produced them (default: the device's current stream on
            this thread).

    Returns:
        The stacked values, flattened.
    """
    first = tensors[0]
    if not first.is_cuda:
        return torch.stack(list(tensors)).reshape(-1).to(torch.float64).numpy()
    stream = stream if stream is not None else torch.cuda.current_stream(first.device)
    with torch.cuda.stream(stream):
        stacked = torch.stack(list(tensors)).reshape(-1).to(torch.float64)
        host = _pinned(stacked.numel())
        host.copy_(stacked, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    pause = POLL_FIRST
    while not done.query():
        time.sleep(pause)
        pause = min(2 * pause, POLL_MAX)
    return host.numpy().copy()  # the buffer is reused by the next read


def _pinned(n: int) -> Tensor:
    """This thread's pinned float64 buffer, at least ``n`` values long (grown by doubling)."""
    buf: Tensor | None = getattr(_PINNED, "buf", None)
    if buf is None or buf.numel() < n:
        size = max(n, PINNED_MIN, 2 * (buf.numel() if buf is not None else 0))
        buf = torch.empty(size, dtype=torch.float64, pin_memory=True)
        _PINNED.buf = buf
    return buf[:n]
