"""The stiffmon wire protocol (DESIGN §4): messages, ``encode`` and ``decode``.

A message travels as one ZeroMQ multipart message ``[topic, header, *buffers]``:

* ``topic``: ``b"<run_id>/<kind>"`` so subscribers can filter by run or kind;
* ``header``: UTF-8 JSON object. Common keys ``v`` (protocol version), ``run``, ``seq``, ``step``,
  ``t`` (unix time), ``kind``, ``arrays`` (one ``{"dtype", "shape"}`` per buffer) and the
  kind's own keys;
* ``buffers``: the message's arrays as raw C-order bytes, in the order of ``arrays``.

This module is shared by the agent and the monitor and needs only numpy. Decoding trusts nothing:
every malformed input raises :class:`ProtocolError` (or its subclass
:class:`ProtocolVersionError`) with a message that says what is wrong. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeAlias

import numpy as np
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


class ProtocolError(ValueError):
    """Raised for any frame sequence that is not a valid stiffmon message."""


class ProtocolVersionError(ProtocolError):
    """Raised when a message uses a protocol version this stiffmon does not understand."""


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


@dataclass(frozen=True, eq=False)
class Message:
    """Fields common to every message.

    Attributes:
        run: Run identifier, new for every process start of an agent.
        seq: Per-run sequence number, increasing by one per message.
        step: Training step the message refers to.
        t: Unix time (seconds) at which the message was made.
    """

    KIND: ClassVar[str] = ""
    ARRAY_FIELDS: ClassVar[tuple[tuple[str, int | None], ...]] = ()

    run: str
    seq: int
    step: int
    t: float

    @property
    def kind(self) -> str:
        """The message kind, e.g. ``"scalars"``."""
        return self.KIND

    @property
    def topic(self) -> bytes:
        """The ZeroMQ topic, ``b"<run>/<kind>"``."""
        return f"{self.run}/{self.KIND}".encode()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray):
                if not (isinstance(b, np.ndarray) and _arrays_equal(a, b)):
                    return False
            elif isinstance(a, float) and isinstance(b, float):
                if not (a == b or (math.isnan(a) and math.isnan(b))):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, eq=False)
class Hello(Message):
    """Run metadata, sent first and whenever a monitor asks for a snapshot.

    Attributes:
        name: Display name of the run (e.g. ``"sgd lr=0.1"``).
        host: Host name of the training process.
        pid: Process id of the training process.
        param_count: Number of trainable parameters of the model.
        optimizer: Optimizer type and hyper-parameters (``type``, ``lr``, ``momentum`` ...).
        batch_size: Training batch size, if known.
        class_names: Class names for the probe labels, in label order.
        probe_train: Number of train-probe examples.
        probe_val: Number of validation-probe examples.
        agent_version: Version of the agent that produced the run.
        meta: Anything else, as a flat JSON object.
    """

    KIND: ClassVar[str] = "hello"

    name: str = ""
    host: str = ""
    pid: int = 0
    param_count: int = 0
    optimizer: Attrs = field(default_factory=dict)
    batch_size: int | None = None
    class_names: tuple[str, ...] = ()
    probe_train: int = 0
    probe_val: int = 0
    agent_version: str = ""
    meta: Attrs = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Scalars(Message):
    """Named scalar values at one step (loss, lr, λ1_H, Tr K, ...).

    The values travel as one float64 buffer so NaN and ±Inf survive the trip.

    Attributes:
        names: Names of the values, e.g. ``("loss", "lr/0")``.
        values: 1-D float64 array, one value per name.
    """

    KIND: ClassVar[str] = "scalars"
    ARRAY_FIELDS: ClassVar[tuple[tuple[str, int | None], ...]] = (("values", 1),)

    names: tuple[str, ...] = ()
    values: Array = field(default_factory=lambda: np.zeros(0, np.float64))

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "values", np.asarray(self.values, dtype=np.float64).reshape(-1))

    @classmethod
    def from_dict(
        cls, values: Mapping[str, float], *, run: str, seq: int, step: int, t: float
    ) -> Scalars:
        """Build a message from ``{name: value}``."""
        return cls(
            run=run,
            seq=seq,
            step=step,
            t=t,
            names=tuple(values),
            values=np.array(list(values.values()), dtype=np.float64),
        )

    def as_dict(self) -> dict[str, float]:
        """Return ``{name: value}``."""
        return {n: float(v) for n, v in zip(self.names, self.values.tolist(), strict=True)}


@dataclass(frozen=True, eq=False)
class Columns(Message):
    """Per-step scalars of many consecutive steps, one array per name (protocol version 2).

    The agent sends the cheap every-step values (loss, lr, momentum, accuracy ...) this way: one
    message per ~50 ms or per few thousand steps instead of one per step. ``step`` and ``t`` of
    the message are those of its last row; ``first_step`` (in the header) is ``steps[0]``.

    On the wire a column may be shortened to one element: a value column of length 1 stands for
    that value at every row, a ``steps`` array of length 1 for consecutive steps from it. In
    memory every array has one element per row.

    Attributes:
        names: Names of the columns, e.g. ``("loss", "lr/0")``.
        steps: 1-D int64 array, the step of each row (non-decreasing).
        times: 1-D float64 array, unix time of each row.
        values: One 1-D float64 array per name, one value per row (NaN and ±Inf allowed).
    """

    KIND: ClassVar[str] = "columns"

    names: tuple[str, ...] = ()
    steps: Array = field(default_factory=lambda: np.zeros(0, np.int64))
    times: Array = field(default_factory=lambda: np.zeros(0, np.float64))
    values: tuple[Array, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "steps", np.asarray(self.steps, dtype=np.int64).reshape(-1))
        object.__setattr__(self, "times", np.asarray(self.times, dtype=np.float64).reshape(-1))
        object.__setattr__(
            self,
            "values",
            tuple(np.asarray(v, dtype=np.float64).reshape(-1) for v in self.values),
        )

    def __len__(self) -> int:
        return int(self.steps.shape[0])

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Columns)
        head = (self.run, self.seq, self.step, self.names)
        if head != (other.run, other.seq, other.step, other.names) or not (
            self.t == other.t or (math.isnan(self.t) and math.isnan(other.t))
        ):
            return False
        pairs = [(self.steps, other.steps), (self.times, other.times)]
        pairs += list(zip(self.values, other.values, strict=False))
        return len(self.values) == len(other.values) and all(_arrays_equal(a, b) for a, b in pairs)

    __hash__ = None

    @classmethod
    def from_columns(
        cls,
        columns: Mapping[str, npt.ArrayLike],
        steps: npt.ArrayLike,
        times: npt.ArrayLike,
        *,
        run: str,
        seq: int,
    ) -> Columns:
        """Build a message from ``{name: values}``; ``step`` and ``t`` come from the last row."""
        st = np.asarray(steps, dtype=np.int64).reshape(-1)
        ts = np.asarray(times, dtype=np.float64).reshape(-1)
        if st.shape[0] == 0:
            raise ValueError("a columns message needs at least one row")
        return cls(
            run=run,
            seq=seq,
            step=int(st[-1]),
            t=float(ts[-1]),
            names=tuple(columns),
            steps=st,
            times=ts,
            values=tuple(np.asarray(v, dtype=np.float64) for v in columns.values()),
        )

    def column(self, name: str) -> Array:
        """The values of one column (KeyError if absent)."""
        return self.values[self.names.index(name)]

    def rows(self) -> list[Scalars]:
        """The batch as one :class:`Scalars` message per row (all with this message's seq)."""
        vals = np.stack(self.values, axis=1) if self.values else np.zeros((len(self), 0))
        return [
            Scalars(run=self.run, seq=self.seq, step=s, t=t, names=self.names, values=vals[i])
            for i, (s, t) in enumerate(zip(self.steps.tolist(), self.times.tolist(), strict=True))
        ]


@dataclass(frozen=True, eq=False)
class Matrix(Message):
    """A named 2-D array, e.g. a class stiffness matrix.

    Attributes:
        name: What the matrix is, e.g. ``"stiffness/cos/train-train"``.
        data: 2-D array.
        row_labels: Optional labels of the rows (empty or one per row).
        col_labels: Optional labels of the columns (empty or one per column).
        attrs: Extra JSON scalars (e.g. within/between-class summaries).
    """

    KIND: ClassVar[str] = "matrix"
    ARRAY_FIELDS: ClassVar[tuple[tuple[str, int | None], ...]] = (("data", 2),)

    name: str = ""
    data: Array = field(default_factory=lambda: np.zeros((0, 0), np.float64))
    row_labels: tuple[str, ...] = ()
    col_labels: tuple[str, ...] = ()
    attrs: Attrs = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Curve(Message):
    """A named curve y(x), e.g. stiffness against distance.

    Attributes:
        name: What the curve is, e.g. ``"stiffness-distance/input"``.
        x: 1-D array of abscissae.
        y: 1-D array of ordinates, same length as ``x``.
        attrs: Extra JSON scalars (e.g. the critical length ``xi``).
    """

    KIND: ClassVar[str] = "curve"
    ARRAY_FIELDS: ClassVar[tuple[tuple[str, int | None], ...]] = (("x", 1), ("y", 1))

    name: str = ""
    x: Array = field(default_factory=lambda: np.zeros(0, np.float64))
    y: Array = field(default_factory=lambda: np.zeros(0, np.float64))
    attrs: Attrs = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Spectrum(Message):
    """Top eigenvalues of an operator, e.g. the Hessian or the gradient covariance.

    Attributes:
        name: Which operator, e.g. ``"hessian"`` or ``"grad-cov"``.
        values: 1-D array of eigenvalues, largest first.
        attrs: Extra JSON scalars (e.g. number of HVPs used).
    """

    KIND: ClassVar[str] = "spectrum"
    ARRAY_FIELDS: ClassVar[tuple[tuple[str, int | None], ...]] = (("values", 1),)

    name: str = ""
    values: Array = field(default_factory=lambda: np.zeros(0, np.float64))
    attrs: Attrs = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Event(Message):
    """Something happened: NaN seen, metric disabled, an error, a schedule stretched.

    Attributes:
        level: ``"info"``, ``"warning"`` or ``"error"``.
        code: Short machine-readable code, e.g. ``"nan-loss"``.
        message: Human-readable text.
        attrs: Extra JSON scalars.
    """

    KIND: ClassVar[str] = "event"
    LEVELS: ClassVar[frozenset[str]] = frozenset({"info", "warning", "error"})

    level: str = "info"
    code: str = ""
    message: str = ""
    attrs: Attrs = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Heartbeat(Message):
    """Sent every second by a live agent.

    Attributes:
        last_seq: Sequence number of the last message published before this one.
        dropped: Messages dropped so far because the publish queue was full.
    """

    KIND: ClassVar[str] = "heartbeat"

    last_seq: int = 0
    dropped: int = 0


@dataclass(frozen=True, eq=False)
class Bye(Message):
    """Sent once when a run ends.

    Attributes:
        reason: Why the run ended, e.g. ``"closed"``, ``"exit"``, ``"sigint"``.
    """

    KIND: ClassVar[str] = "bye"

    reason: str = ""


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (Hello, Scalars, Columns, Matrix, Curve, Spectrum, Event, Heartbeat, Bye)
}
"""Message class for each kind."""

AnyMessage: TypeAlias = (
    Hello | Scalars | Columns | Matrix | Curve | Spectrum | Event | Heartbeat | Bye
)

PER_STEP_KINDS = ("scalars", "columns")
"""Kinds that carry per-step scalars: one step per ``scalars``, a batch per ``columns``."""


def expand_columns(msgs: Iterable[AnyMessage]) -> list[AnyMessage]:
    """The messages with every ``columns`` batch replaced by one ``scalars`` message per row."""
    out: list[AnyMessage] = []
    for m in msgs:
        if isinstance(m, Columns):
            out.extend(m.rows())
        else:
            out.append(m)
    return out


_COMMON = ("run", "seq", "step", "t")


# --------------------------------------------------------------------------- encoding


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


def encode(msg: Message) -> list[bytes]:
    """Encode a message as multipart ZeroMQ frames ``[topic, header, *buffers]``.

    Args:
        msg: Any message of this module.

    Returns:
        The frames; buffers are the raw C-order bytes of the message's arrays.

    Raises:
        ValueError: If the message cannot be represented (bad dtype, non-JSON attribute ...).
    """
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


def _wire_column(a: Array, runs: bool) -> Array:
    """Shorten a column to one element where the wire allows it (see :class:`Columns`)."""
    n = a.shape[0]
    if n > 1:
        if runs and a[-1] - a[0] == n - 1 and bool((np.diff(a) == 1).all()):
            return a[:1]
        if not runs:
            bits = a.view(np.int64)  # bitwise: keeps -0.0 and NaN payloads apart
            if bool((bits == bits[0]).all()):
                return a[:1]
    return a


def _encode_columns(msg: Columns, header: dict[str, Any]) -> list[bytes]:
    n = len(msg)
    if n == 0 or n > MAX_COLUMN_ROWS:
        raise ValueError(f"columns: {n} rows, need 1 to {MAX_COLUMN_ROWS}")
    if len(msg.values) != len(msg.names):
        raise ValueError(f"columns: {len(msg.names)} names but {len(msg.values)} value arrays")
    if msg.times.shape[0] != n or any(v.shape[0] != n for v in msg.values):
        raise ValueError(f"columns: every array needs {n} elements (one per step)")
    if int(msg.steps[0]) < 0 or bool((np.diff(msg.steps) < 0).any()):
        raise ValueError("columns: steps must be non-negative and non-decreasing")
    if int(msg.steps[-1]) != int(msg.step):
        raise ValueError(f"columns: step {msg.step} is not the last row's step {msg.steps[-1]}")
    if not bool(np.isfinite(msg.times).all()):
        raise ValueError("columns: times must be finite")
    arrays = [_wire_column(msg.steps, True), msg.times]
    arrays += [_wire_column(v, False) for v in msg.values]
    header["arrays"] = [{"dtype": a.dtype.str, "shape": [a.shape[0]]} for a in arrays]
    header["names"] = list(msg.names)
    header["first_step"] = int(msg.steps[0])
    try:
        text = json.dumps(header, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot encode columns header: {exc}") from exc
    header_bytes = text.encode("utf-8")
    return [msg.topic, header_bytes, *(a.tobytes() for a in arrays)]


# --------------------------------------------------------------------------- decoding


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


def _decode_columns(
    h: Mapping[str, Any],
    buffers: Sequence[bytes | bytearray | memoryview],
    run: str,
    seq: int,
    step: int,
    t: float,
) -> Columns:
    kind = Columns.KIND
    names = _get_str_tuple(h, "names", kind)
    first_step = _check_range(_get(h, "first_step", int, kind), "first_step", kind)
    specs = _get(h, "arrays", list, kind)
    if len(specs) != 2 + len(names):
        raise ProtocolError(
            f"{kind}: header describes {len(specs)} arrays, steps + times + {len(names)} names "
            f"need {2 + len(names)}"
        )
    if len(buffers) != len(specs):
        raise ProtocolError(
            f"{kind}: header describes {len(specs)} arrays, got {len(buffers)} buffers"
        )
    arrays = [
        _decode_array(spec, buf, i, kind)
        for i, (spec, buf) in enumerate(zip(specs, buffers, strict=True))
    ]
    for i, (a, want) in enumerate(zip(arrays, ["<i8"] + ["<f8"] * (len(arrays) - 1), strict=True)):
        if a.ndim != 1 or a.dtype.str != want:
            raise ProtocolError(
                f"{kind}: arrays[{i}] must be 1-D {want}, got {a.dtype.str}{a.shape}"
            )
    times = arrays[1]
    n = times.shape[0]
    if not 1 <= n <= MAX_COLUMN_ROWS:
        raise ProtocolError(f"{kind}: {n} rows, need 1 to {MAX_COLUMN_ROWS}")
    if not bool(np.isfinite(times).all()):
        raise ProtocolError(f"{kind}: times must be finite")
    for i, a in enumerate(arrays):
        if a.shape[0] not in (1, n):
            raise ProtocolError(f"{kind}: arrays[{i}] has {a.shape[0]} elements for {n} rows")
    steps = arrays[0]
    if steps.shape[0] != n:  # consecutive steps from steps[0]
        if int(steps[0]) > MAX_INT - n:
            raise ProtocolError(f"{kind}: steps from {int(steps[0])} overflow int64")
        steps = steps[0] + np.arange(n, dtype=np.int64)
    if int(steps[0]) != first_step or int(steps[-1]) != step:
        raise ProtocolError(
            f"{kind}: steps run from {int(steps[0])} to {int(steps[-1])}, the header says "
            f"{first_step} to {step}"
        )
    if int(steps[0]) < 0 or bool((np.diff(steps) < 0).any()):
        raise ProtocolError(f"{kind}: steps must be non-negative and non-decreasing")
    values = tuple(a if a.shape[0] == n else np.full(n, a[0]) for a in arrays[2:])
    return Columns(
        run=run, seq=seq, step=step, t=t, names=names, steps=steps, times=times, values=values
    )


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
