"""The frozen message dataclasses, one per kind (all but ``columns``, see ``columns.py``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import ClassVar

import numpy as np

from stiffmon.protocol.limits import Array, Attrs
from stiffmon.protocol.validate import _arrays_equal


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
        param_count: Number of trainable parameters measured: those the optimizer holds (the
            whole model's count is ``meta["model_param_count"]`` where it differs).
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
        measuring: The heavy measurement the training loop is in (``"sharpness"``), ``""``
            between measurements: no new step comes meanwhile, and that is no hang. Added
            without a version change: an older monitor ignores it, an older agent's heartbeat
            reads as ``""``.
    """

    KIND: ClassVar[str] = "heartbeat"
    MEASURING_MAX: ClassVar[int] = 64  # characters

    last_seq: int = 0
    dropped: int = 0
    measuring: str = ""


@dataclass(frozen=True, eq=False)
class Bye(Message):
    """Sent once when a run ends.

    Attributes:
        reason: Why the run ended: ``"closed"`` (``close()``), ``"exit"`` (interpreter exit),
            ``"interrupted"`` (Ctrl-C), ``"terminated"`` (SIGTERM), ``"error: RuntimeError"``
            (an uncaught exception), or a framework's own words.
    """

    KIND: ClassVar[str] = "bye"

    reason: str = ""
