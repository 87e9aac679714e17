"""Protocol version, size limits, the dtype whitelist and the wire type aliases (DESIGN §4)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

import numpy.typing as npt

PROTOCOL_VERSION = 2
"""Version written into every header; decoders refuse newer versions.

Version 2 added the ``columns`` kind (per-step scalars of many steps in one message); every
version-1 message is still a valid version-2 message, so version-1 frames and session files
decode unchanged.
"""

MIN_PROTOCOL_VERSION = 1
"""Oldest version decoders accept."""

MAX_COLUMN_ROWS = 1 << 20
"""Most steps one ``columns`` message may carry."""

MAX_HEADER_BYTES = 1 << 20
"""Largest JSON header accepted (1 MiB)."""

MAX_BUFFER_BYTES = 64 << 20
"""Default largest single array buffer accepted (64 MiB); ``decode`` takes a tighter limit.

The transport sets ``ZMQ_MAXMSGSIZE`` from this, so a larger frame is refused by the receiving
socket before it is allocated."""

MAX_TOPIC_BYTES = 512
MAX_NDIM = 8

MAX_INT = (1 << 63) - 1
"""Largest integer accepted in any header field (int64, so numpy and the store never overflow)."""

MAX_PID = (1 << 32) - 1
"""Largest process id accepted in ``hello``."""

ALLOWED_DTYPES: frozenset[str] = frozenset(
    {"|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8"}
)
"""Array dtypes allowed on the wire (little-endian numeric and bool only; never object)."""

JSONScalar: TypeAlias = str | int | float | bool | None
Attrs: TypeAlias = Mapping[str, JSONScalar]
Array: TypeAlias = npt.NDArray[Any]
