"""Field, range and array checks shared by the encoder and the decoder.

Encoder-side checks raise :class:`ValueError`; decoder-side checks raise
:class:`~stiffmon.protocol.errors.ProtocolError` with a message that says what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from stiffmon.protocol.errors import ProtocolError
from stiffmon.protocol.limits import ALLOWED_DTYPES, MAX_INT, MAX_NDIM, Array, Attrs, JSONScalar


def _as_wire_array(a: npt.ArrayLike, what: str) -> Array:
    """Return ``a`` as a C-contiguous little-endian array with an allowed dtype."""
    arr = np.asarray(a)
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and np.little_endian is False):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if not arr.flags.c_contiguous:  # np.ascontiguousarray would turn 0-d into 1-d
        arr = arr.copy(order="C")
    if arr.dtype.str not in ALLOWED_DTYPES:
        raise ValueError(f"{what}: dtype {arr.dtype.str!r} cannot go on the wire")
    if arr.ndim > MAX_NDIM:
        raise ValueError(f"{what}: {arr.ndim} dimensions, at most {MAX_NDIM} allowed")
    return arr


def _arrays_equal(a: Array, b: Array) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "f":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def _check_attrs(attrs: Attrs, what: str) -> dict[str, JSONScalar]:
    out: dict[str, JSONScalar] = {}
    for k, v in attrs.items():
        if not isinstance(k, str):
            raise ValueError(f"{what}: key {k!r} is not a string")
        if v is not None and not isinstance(v, str | int | float | bool):
            raise ValueError(f"{what}[{k!r}]: {type(v).__name__} is not a JSON scalar")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{what}[{k!r}]: non-finite float {v}; put it in an array instead")
        out[k] = v
    return out


def _check_run_id(run: object) -> None:
    if (
        not isinstance(run, str)
        or not run
        or "/" in run
        or len(run.encode("utf-8", "replace")) > 256
    ):
        raise ValueError(
            f"run id must be a non-empty string without '/', at most 256 bytes: {run!r}"
        )


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"header contains the non-JSON number {name}")


def _get(h: Mapping[str, Any], key: str, types: type | tuple[type, ...], kind: str) -> Any:
    if key not in h:
        raise ProtocolError(f"{kind} header lacks the required field {key!r}")
    value = h[key]
    # bool is a subclass of int: only accept it where bool is asked for.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ProtocolError(f"{kind} header field {key!r} must not be a bool")
    if not isinstance(value, types):
        want = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise ProtocolError(
            f"{kind} header field {key!r} is {type(value).__name__}, expected {want}"
        )
    return value


def _get_str_tuple(h: Mapping[str, Any], key: str, kind: str) -> tuple[str, ...]:
    value = _get(h, key, list, kind)
    if not all(isinstance(s, str) for s in value):
        raise ProtocolError(f"{kind} header field {key!r} must be a list of strings")
    return tuple(value)


def _check_range(value: int, what: str, kind: str, lo: int = 0, hi: int = MAX_INT) -> int:
    """``value`` if ``lo <= value <= hi``; a :class:`ProtocolError` naming ``what`` otherwise."""
    if not lo <= value <= hi:
        raise ProtocolError(f"{kind}: {what} = {value} is out of range [{lo}, {hi}]")
    return value


def _get_attrs(h: Mapping[str, Any], key: str, kind: str) -> dict[str, JSONScalar]:
    value = _get(h, key, dict, kind)
    for k, v in value.items():
        if v is not None and not isinstance(v, str | int | float | bool):
            raise ProtocolError(f"{kind} header field {key}[{k!r}] is not a JSON scalar")
        if isinstance(v, int) and not isinstance(v, bool):
            _check_range(v, f"{key}[{k!r}]", kind, -MAX_INT - 1)
        elif isinstance(v, float) and not math.isfinite(v):
            raise ProtocolError(f"{kind} header field {key}[{k!r}] is not a finite number")
    return dict(value)


def _decode_array(spec: Any, buf: bytes | bytearray | memoryview, index: int, kind: str) -> Array:
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape"}:
        raise ProtocolError(f"{kind}: arrays[{index}] must be an object with dtype and shape")
    dtype_str, shape = spec["dtype"], spec["shape"]
    if not isinstance(dtype_str, str) or dtype_str not in ALLOWED_DTYPES:
        raise ProtocolError(
            f"{kind}: arrays[{index}] has dtype {dtype_str!r}, not on the whitelist"
        )
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_INT for d in shape
        )
    ):
        raise ProtocolError(f"{kind}: arrays[{index}] has an invalid shape {shape!r}")
    dtype = np.dtype(dtype_str)
    expected = dtype.itemsize * math.prod(shape)
    if expected != len(buf):
        raise ProtocolError(
            f"{kind}: arrays[{index}] {dtype_str}{tuple(shape)} needs {expected} bytes, "
            f"the buffer has {len(buf)}"
        )
    arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
    if dtype_str == "|b1" and arr.size and not np.isin(arr.view(np.uint8), (0, 1)).all():
        raise ProtocolError(f"{kind}: arrays[{index}] holds bool bytes other than 0 and 1")
    out: Array = arr.copy()  # own, writable memory: frames may be reused by the caller
    return out
