"""Transport conventions shared by the agent, the monitor client, the recorder and the relay.

An agent binds two sockets (DESIGN §4, ZeroMQ guide "Clone" pattern):

* a PUB socket at ``tcp://host:P`` for live updates (one multipart wire message each), and
* a ROUTER socket at ``tcp://host:P+1`` answering snapshot requests.

A snapshot request is ``[SNAPSHOT_REQUEST, header]`` sent from a DEALER; the reply is a series of
``[SNAPSHOT_MESSAGE, *frames]`` (each an ordinary wire message from the history, oldest first),
one ``[SNAPSHOT_END, {"run": id, "seq": n}]`` per run (n: the last seq the history covers) and a
final ``[SNAPSHOT_DONE, header]``. A relay answers with the runs of every agent behind it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stiffmon import protocol as p

SNAPSHOT_REQUEST = b"stiffmon/snapshot?"
SNAPSHOT_MESSAGE = b"stiffmon/snapshot-msg"
SNAPSHOT_END = b"stiffmon/snapshot-end"
SNAPSHOT_DONE = b"stiffmon/snapshot-done"

FIRST_SEQ_ORDER = "first-seq"
"""``"order"`` of a snapshot request from a client that takes a snapshot in first-``seq`` order
(chunks whose ``seq`` ranges interleave, sparse ``columns``); a request without it gets the
history in strictly increasing ``seq``, as monitors of before the sparse chunks need it."""


def snapshot_request(first_seq_order: bool = True) -> list[bytes]:
    """The frames of a snapshot request."""
    body: dict[str, Any] = {"v": p.PROTOCOL_VERSION}
    if first_seq_order:
        body["order"] = FIRST_SEQ_ORDER
    return encode_control(SNAPSHOT_REQUEST, body)


def takes_first_seq_order(frames: list[bytes]) -> bool:
    """Whether a request's frames (after the tag) ask for a snapshot in first-``seq`` order."""
    return bool(frames) and decode_control(frames[0]).get("order") == FIRST_SEQ_ORDER


MAX_DATA_FRAME_BYTES = max(p.MAX_TOPIC_BYTES, p.MAX_HEADER_BYTES, p.MAX_BUFFER_BYTES)
"""``ZMQ_MAXMSGSIZE`` of every socket that receives wire messages (monitor SUB and DEALER,
recorder, relay XSUB and upstream DEALERs): no frame of a valid message is larger, and libzmq
refuses a larger one from its length field, before allocating it, and drops the connection."""

MAX_CONTROL_FRAME_BYTES = 64 << 10
"""``ZMQ_MAXMSGSIZE`` of sockets that only receive snapshot requests or subscriptions (agent
ROUTER and PUB, relay ROUTER and XPUB)."""

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5555
PORT_SEARCH = 200
"""How many port pairs an agent tries from the default before giving up."""

_TCP = re.compile(r"^tcp://(?P<host>\[[^\]]+\]|[^:/]+):(?P<port>\d+)$")


class EndpointError(ValueError):
    """An endpoint string that stiffmon cannot use."""


@dataclass(frozen=True)
class Endpoint:
    """A live run's address: the PUB port and the snapshot (ROUTER) port right above it."""

    host: str
    port: int

    @property
    def pub(self) -> str:
        """ZeroMQ address of the update stream."""
        return f"tcp://{self.host}:{self.port}"

    @property
    def snapshot(self) -> str:
        """ZeroMQ address of the snapshot service (PUB port + 1)."""
        return f"tcp://{self.host}:{self.port + 1}"

    def __str__(self) -> str:
        return self.pub


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``tcp://host:port`` (``host:port`` and ``:port`` are accepted too).

    Raises:
        EndpointError: With the reason, for anything else.
    """
    raw = text.strip()
    if raw.startswith(":"):
        raw = f"tcp://{DEFAULT_HOST}{raw}"
    elif "://" not in raw:
        raw = f"tcp://{raw}"
    m = _TCP.match(raw)
    if not m:
        raise EndpointError(f"not a tcp://host:port endpoint: {text!r}")
    port = int(m.group("port"))
    if not 0 < port < 65535:
        raise EndpointError(f"port {port} out of range (1-65534; the snapshot port is port + 1)")
    return Endpoint(m.group("host"), port)


def free_port_pair(host: str = DEFAULT_HOST, tries: int = 200) -> int:
    """A port p on ``host`` with p and p + 1 both free (an update port and its snapshot port).

    Raises:
        EndpointError: If none was found in ``tries`` attempts.
    """
    import socket

    for _ in range(tries):
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port >= 65534:
            continue
        try:
            with socket.socket() as s2:
                s2.bind((host, port + 1))
        except OSError:
            continue
        return port
    raise EndpointError(f"no free port pair on {host}")


def limit_frames(sock: Any, max_bytes: int) -> None:
    """Set ``ZMQ_MAXMSGSIZE``: a peer sending a larger frame is disconnected before it costs
    memory (libzmq checks each frame's length field before allocating the frame)."""
    import zmq

    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (as in an endpoint) only accepts connections from this machine."""
    h = host.strip("[]").lower()
    return h == "localhost" or h == "::1" or h.startswith("127.")


def exposure_warning(what: str, endpoint: object, host: str, curve: object) -> str | None:
    """The warning for binding a non-loopback address without CURVE (None when there is none)."""
    if curve is not None or is_loopback(host):
        return None
    return (
        f"stiffmon: {what} binds {endpoint}, which is not loopback, without CURVE: any host "
        "that can reach it can read every run and ask for its whole history. Bind 127.0.0.1 "
        "and watch over ssh://, or use CURVE keys (stiffmon keys)."
    )


def encode_control(tag: bytes, payload: dict[str, Any]) -> list[bytes]:
    """A control message: tag frame + JSON frame."""
    return [tag, json.dumps(payload).encode()]


def decode_control(frame: bytes) -> dict[str, Any]:
    """Parse a control message's JSON frame; ``{}`` for anything malformed."""
    try:
        value = json.loads(bytes(frame).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class CurveKeys:
    """CURVE key material for one side of a connection (all keys Z85-encoded bytes).

    Attributes:
        public: This side's public key.
        secret: This side's secret key.
        server_public: The server's public key (clients only).
        authorized_dir: Directory of authorised client public keys (servers only).
    """

    public: bytes
    secret: bytes
    server_public: bytes | None = None
    authorized_dir: Path | None = None


def load_curve_server(keys_dir: str | Path) -> CurveKeys:
    """Server keys from a directory made by ``stiffmon keys``.

    Expects ``server.key_secret`` and an ``authorized/`` folder of client ``*.key`` files.
    """
    import zmq.auth

    d = Path(keys_dir)
    public, secret = zmq.auth.load_certificate(d / "server.key_secret")
    if secret is None:
        raise ValueError(f"{d / 'server.key_secret'} holds no secret key")
    return CurveKeys(public, secret, authorized_dir=d / "authorized")


def load_curve_client(keys_dir: str | Path, name: str = "client") -> CurveKeys:
    """Client keys: ``<name>.key_secret`` and the server's ``server.key`` from ``keys_dir``."""
    import zmq.auth

    d = Path(keys_dir)
    public, secret = zmq.auth.load_certificate(d / f"{name}.key_secret")
    server_public, _ = zmq.auth.load_certificate(d / "server.key")
    if secret is None:
        raise ValueError(f"{d / (name + '.key_secret')} holds no secret key")
    return CurveKeys(public, secret, server_public=server_public)


def make_keys(keys_dir: str | Path, clients: tuple[str, ...] = ("client",)) -> Path:
    """Create a server key pair and client key pairs; authorise the clients.

    Layout: ``server.key`` / ``server.key_secret``, ``<client>.key`` / ``<client>.key_secret``,
    and ``authorized/<client>.key`` (the server accepts exactly the keys in that folder).
    """
    import shutil

    import zmq.auth

    d = Path(keys_dir)
    (d / "authorized").mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(d, "server")
    for c in clients:
        public_file, _ = zmq.auth.create_certificates(d, c)
        shutil.copy(public_file, d / "authorized" / Path(public_file).name)
    for secret in d.glob("*.key_secret"):
        secret.chmod(0o600)
    return d
