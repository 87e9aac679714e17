"""The stiffmon wire protocol (DESIGN §4): messages, ``encode`` and ``decode``.

A message travels as one ZeroMQ multipart message ``[topic, header, *buffers]``:

* ``topic``: ``b"<run_id>/<kind>"`` so subscribers can filter by run or kind;
* ``header``: UTF-8 JSON object. Common keys ``v`` (protocol version), ``run``, ``seq``, ``step``,
  ``t`` (unix time), ``kind``, ``arrays`` (one ``{"dtype", "shape"}`` per buffer) and the
  kind's own keys;
* ``buffers``: the message's arrays as raw C-order bytes, in the order of ``arrays``.

This package is shared by the agent and the monitor and needs only numpy. Decoding trusts nothing:
every malformed input raises :class:`ProtocolError` (or its subclass
:class:`ProtocolVersionError`) with a message that says what is wrong. Nothing is ever unpickled.

The package is split by concern; every name is re-exported here, so ``from stiffmon import
protocol as p`` and ``from stiffmon.protocol import X`` work as before:

* ``limits``: protocol version, size limits, the dtype whitelist, type aliases;
* ``errors``: :class:`ProtocolError` and :class:`ProtocolVersionError`;
* ``validate``: field, range and array checks shared by encoder and decoder;
* ``messages``: the frozen message dataclasses (all kinds but ``columns``);
* ``columns``: the ``columns`` kind and its wire form;
* ``kinds``: ``MESSAGE_TYPES``, ``AnyMessage``, ``PER_STEP_KINDS``, ``expand_columns``;
* ``codec``: :func:`encode` and :func:`decode`.
"""

from __future__ import annotations

from stiffmon.protocol.codec import decode, encode
from stiffmon.protocol.columns import Columns
from stiffmon.protocol.errors import ProtocolError, ProtocolVersionError
from stiffmon.protocol.kinds import MESSAGE_TYPES, PER_STEP_KINDS, AnyMessage, expand_columns
from stiffmon.protocol.limits import (
    ALLOWED_DTYPES,
    MAX_BUFFER_BYTES,
    MAX_COLUMN_ROWS,
    MAX_HEADER_BYTES,
    MAX_INT,
    MAX_NDIM,
    MAX_PID,
    MAX_TOPIC_BYTES,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Array,
    Attrs,
    JSONScalar,
)
from stiffmon.protocol.messages import (
    Bye,
    Curve,
    Event,
    Heartbeat,
    Hello,
    Matrix,
    Message,
    Scalars,
    Spectrum,
)

__all__ = [
    "ALLOWED_DTYPES",
    "MAX_BUFFER_BYTES",
    "MAX_COLUMN_ROWS",
    "MAX_HEADER_BYTES",
    "MAX_INT",
    "MAX_NDIM",
    "MAX_PID",
    "MAX_TOPIC_BYTES",
    "MESSAGE_TYPES",
    "MIN_PROTOCOL_VERSION",
    "PER_STEP_KINDS",
    "PROTOCOL_VERSION",
    "AnyMessage",
    "Array",
    "Attrs",
    "Bye",
    "Columns",
    "Curve",
    "Event",
    "Heartbeat",
    "Hello",
    "JSONScalar",
    "Matrix",
    "Message",
    "ProtocolError",
    "ProtocolVersionError",
    "Scalars",
    "Spectrum",
    "decode",
    "encode",
    "expand_columns",
]
