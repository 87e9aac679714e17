"""``encode`` and ``decode``: messages to multipart frames and back, validating everything."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

import numpy as np

from stiffmon.protocol.columns import Columns, _decode_columns, _encode_columns
from stiffmon.protocol.errors import ProtocolError, ProtocolVersionError
from stiffmon.protocol.kinds import MESSAGE_TYPES, AnyMessage
from stiffmon.protocol.limits import (
    MAX_BUFFER_BYTES,
    MAX_HEADER_BYTES,
    MAX_INT,
    MAX_PID,
    MAX_TOPIC_BYTES,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
)
from stiffmon.protocol.messages import Curve, Event, Heartbeat, Hello, Matrix, Message, Scalars
from stiffmon.protocol.validate import (
    _as_wire_array,
    _check_attrs,
    _check_range,
    _check_run_id,
    _decode_array,
    _get,
    _get_attrs,
    _get_str_tuple,
    _reject_constant,
)

_COMMON = ("run", "seq", "step", "t")


def encode(msg: Message) -> list[bytes]:
    """Encode a message as multipart ZeroMQ frames ``[topic, header, *buffers]``.

    Args:
        msg: Any message of this module.

    Returns:
        The frames; buffers are the raw C-order bytes of the message's arrays.

    Raises:
        ValueError: If the message cannot be represented (bad dtype, non-JSON attribute ...)
            or a frame is over the limit every reader enforces (:data:`MAX_HEADER_BYTES`,
            :data:`MAX_BUFFER_BYTES`): such a frame would make a recording unreadable and a
            live monitor's socket drop the connection.
    """
    frames = _encode(msg)
    if len(frames[1]) > MAX_HEADER_BYTES:
        raise ValueError(
            f"{msg.KIND} header is {len(frames[1]):,} bytes, over the {MAX_HEADER_BYTES:,}-byte "
            "limit every reader enforces"
        )
    for i, buf in enumerate(frames[2:]):
        if len(buf) > MAX_BUFFER_BYTES:
            raise ValueError(
                f"{msg.KIND} array {i} is {len(buf):,} bytes, over the {MAX_BUFFER_BYTES:,}-byte "
                "limit every reader enforces"
            )
    return frames


def _encode(msg: Message) -> list[bytes]:
    if type(msg) not in MESSAGE_TYPES.values():
        raise ValueError(f"cannot encode {type(msg).__name__}: not a stiffmon message")
    _check_run_id(msg.run)
    header: dict[str, Any] = {"v": PROTOCOL_VERSION}
    header["run"] = msg.run
    header["seq"] = int(msg.seq)
    header["step"] = int(msg.step)
    header["t"] = float(msg.t)
    header["kind"] = msg.KIND
    if not math.isfinite(header["t"]):
        raise ValueError("t must be finite")
    if not (0 <= header["seq"] <= MAX_INT and 0 <= header["step"] <= MAX_INT):
        raise ValueError(f"seq and step must be in [0, 2^63): {header['seq']}, {header['step']}")
    if isinstance(msg, Columns):
        return _encode_columns(msg, header)
    array_names = {name for name, _ in msg.ARRAY_FIELDS}
    buffers: list[bytes] = []
    specs: list[dict[str, Any]] = []
    for name, ndim in msg.ARRAY_FIELDS:
        arr = _as_wire_array(getattr(msg, name), f"{msg.KIND}.{name}")
        if ndim is not None and arr.ndim != ndim:
            raise ValueError(f"{msg.KIND}.{name} must be {ndim}-D, got shape {arr.shape}")
        specs.append({"dtype": arr.dtype.str, "shape": list(arr.shape)})
        buffers.append(arr.tobytes(order="C"))
    header["arrays"] = specs
    for f in fields(msg):
        if f.name in _COMMON or f.name in array_names:
            continue
        value = getattr(msg, f.name)
        if f.name in ("optimizer", "meta", "attrs"):
            value = _check_attrs(value, f"{msg.KIND}.{f.name}")
        elif isinstance(value, tuple):
            value = list(value)
        header[f.name] = value
    try:
        header_bytes = json.dumps(header, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot encode {msg.KIND} header: {exc}") from exc
    return [msg.topic, header_bytes, *buffers]


def decode(
    frames: Sequence[bytes | bytearray | memoryview],
    *,
    max_buffer_bytes: int = MAX_BUFFER_BYTES,
) -> AnyMessage:
    """Decode multipart frames ``[topic, header, *buffers]`` into a message.

    Everything is validated: frame count and sizes, UTF-8 JSON header, protocol version,
    kind, required fields and their types, the dtype whitelist, ``shape × itemsize`` against
    each buffer's length, and that the topic matches the header.

    Args:
        frames: The multipart message as received (``bytes`` or ``zmq.Frame.buffer``).
        max_buffer_bytes: Largest buffer frame accepted.

    Returns:
        The decoded message.

    Raises:
        ProtocolVersionError: If the header's protocol version is newer than ours.
        ProtocolError: For any other malformed input.
    """
    try:
        return _decode(frames, max_buffer_bytes)
    except ProtocolError:
        raise
    except Exception as exc:  # anything unforeseen is still the caller's bad input
        raise ProtocolError(f"malformed message: {type(exc).__name__}: {exc}") from exc


def _decode(frames: Sequence[bytes | bytearray | memoryview], max_buffer_bytes: int) -> AnyMessage:
    if not isinstance(frames, Sequence) or isinstance(frames, bytes | bytearray | memoryview | str):
        raise ProtocolError("expected a sequence of frames")
    if len(frames) < 2:
        raise ProtocolError(f"expected at least 2 frames (topic, header), got {len(frames)}")
    topic, header_raw, *buffers = frames
    for i, fr in enumerate(frames):
        if not isinstance(fr, bytes | bytearray | memoryview):
            raise ProtocolError(f"frame {i} is {type(fr).__name__}, not bytes")
    if len(topic) > MAX_TOPIC_BYTES:
        raise ProtocolError(f"topic frame is {len(topic)} bytes, limit {MAX_TOPIC_BYTES}")
    if len(header_raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header frame is {len(header_raw)} bytes, limit {MAX_HEADER_BYTES}")
    for i, buf in enumerate(buffers):
        if len(buf) > max_buffer_bytes:
            raise ProtocolError(f"buffer frame {i} is {len(buf)} bytes, limit {max_buffer_bytes}")
    try:
        text = bytes(header_raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"header is not UTF-8: {exc}") from exc
    try:
        h = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"header is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ProtocolError("header JSON is nested too deeply") from exc
    if not isinstance(h, dict):
        raise ProtocolError(f"header must be a JSON object, got {type(h).__name__}")

    v = h.get("v")
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(f"header lacks an integer protocol version 'v' (got {v!r})")
    if v > PROTOCOL_VERSION:
        raise ProtocolVersionError(
            f"message uses protocol version {v}, but this stiffmon understands version "
            f"{PROTOCOL_VERSION}; upgrade stiffmon on this side"
        )
    if v < MIN_PROTOCOL_VERSION:
        raise ProtocolVersionError(f"message uses unknown protocol version {v}")

    kind = h.get("kind")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message kind {kind!r}")
    cls = MESSAGE_TYPES[kind]

    run = _get(h, "run", str, kind)
    seq = _get(h, "seq", int, kind)
    step = _get(h, "step", int, kind)
    t = _get(h, "t", (int, float), kind)
    if seq < 0 or step < 0:
        raise ProtocolError(f"{kind}: seq and step must be non-negative (seq={seq}, step={step})")
    _check_range(seq, "seq", kind)
    _check_range(step, "step", kind)
    if not math.isfinite(t):
        raise ProtocolError(f"{kind}: t must be finite")
    if not run or "/" in run:
        raise ProtocolError(f"{kind}: invalid run id {run!r}")
    try:
        expected_topic = f"{run}/{kind}".encode()
    except UnicodeEncodeError as exc:
        raise ProtocolError(f"{kind}: run id is not encodable: {exc}") from exc
    if bytes(topic) != expected_topic:
        raise ProtocolError(f"topic {bytes(topic)!r} does not match header ({expected_topic!r})")

    if cls is Columns:
        if v < 2:
            raise ProtocolError(f"columns: kind needs protocol version 2, header says {v}")
        return _decode_columns(h, buffers, run, seq, step, float(t))
    specs = _get(h, "arrays", list, kind)
    if len(specs) != len(cls.ARRAY_FIELDS):
        raise ProtocolError(
            f"{kind}: header describes {len(specs)} arrays, the kind has {len(cls.ARRAY_FIELDS)}"
        )
    if len(buffers) != len(specs):
        raise ProtocolError(
            f"{kind}: header describes {len(specs)} arrays, got {len(buffers)} buffers"
        )

    kwargs: dict[str, Any] = {"run": run, "seq": seq, "step": step, "t": float(t)}
    for i, ((name, ndim), spec, buf) in enumerate(
        zip(cls.ARRAY_FIELDS, specs, buffers, strict=True)
    ):
        arr = _decode_array(spec, buf, i, kind)
        if ndim is not None and arr.ndim != ndim:
            raise ProtocolError(f"{kind}.{name} must be {ndim}-D, got shape {arr.shape}")
        kwargs[name] = arr

    _decode_fields(cls, h, kwargs)
    msg = cls(**kwargs)
    _check_consistency(msg)
    return msg  # type: ignore[return-value]


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "host": str,
    "pid": int,
    "param_count": int,
    "probe_train": int,
    "probe_val": int,
    "agent_version": str,
    "level": str,
    "code": str,
    "message": str,
    "last_seq": int,
    "dropped": int,
    "reason": str,
}


def _decode_fields(cls: type[Message], h: Mapping[str, Any], kwargs: dict[str, Any]) -> None:
    kind = cls.KIND
    for f in fields(cls):
        if f.name in kwargs:
            continue
        if f.name in ("optimizer", "meta", "attrs"):
            kwargs[f.name] = _get_attrs(h, f.name, kind)
        elif f.name in ("names", "class_names", "row_labels", "col_labels"):
            kwargs[f.name] = _get_str_tuple(h, f.name, kind)
        elif f.name == "measuring":  # added later: absent from older agents' heartbeats
            value = h.get(f.name, "")
            if not isinstance(value, str) or len(value) > Heartbeat.MEASURING_MAX:
                raise ProtocolError(
                    f"{kind}.measuring must be a string of at most {Heartbeat.MEASURING_MAX} "
                    f"characters, got {str(value)[:80]!r}"
                )
            kwargs[f.name] = value
        elif f.name == "batch_size":
            value = _get(h, f.name, (int, type(None)), kind)
            if value is not None:
                _check_range(value, f.name, kind)
            kwargs[f.name] = value
        else:
            value = _get(h, f.name, _FIELD_TYPES[f.name], kind)
            if isinstance(value, int):
                _check_range(value, f.name, kind, hi=MAX_PID if f.name == "pid" else MAX_INT)
            kwargs[f.name] = value


def _check_consistency(msg: Message) -> None:
    kind = msg.KIND
    if isinstance(msg, Scalars):
        if len(msg.names) != msg.values.shape[0]:
            raise ProtocolError(f"scalars: {len(msg.names)} names but {msg.values.shape[0]} values")
        if msg.values.dtype != np.float64:
            raise ProtocolError(f"scalars.values must be <f8, got {msg.values.dtype.str}")
    elif isinstance(msg, Matrix):
        rows, cols = msg.data.shape
        if msg.row_labels and len(msg.row_labels) != rows:
            raise ProtocolError(f"matrix: {len(msg.row_labels)} row labels for {rows} rows")
        if msg.col_labels and len(msg.col_labels) != cols:
            raise ProtocolError(f"matrix: {len(msg.col_labels)} column labels for {cols} columns")
    elif isinstance(msg, Curve):
        if msg.x.shape != msg.y.shape:
            raise ProtocolError(f"curve: x has shape {msg.x.shape}, y has {msg.y.shape}")
    elif isinstance(msg, Event):
        if msg.level not in Event.LEVELS:
            raise ProtocolError(f"event: unknown level {msg.level!r}")
    elif isinstance(msg, Heartbeat):
        if msg.last_seq < 0 or msg.dropped < 0:
            raise ProtocolError(f"{kind}: last_seq and dropped must be non-negative")
    elif isinstance(msg, Hello):
        if msg.pid < 0 or msg.param_count < 0 or msg.probe_train < 0 or msg.probe_val < 0:
            raise ProtocolError("hello: counts must be non-negative")
