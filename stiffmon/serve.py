"""``stiffmon serve``: the monitor in a browser tab, served with textual-serve.

Every browser tab that opens the page gets its own monitor process (``stiffmon replay`` for
session files, ``stiffmon watch`` for live endpoints or the locally registered runs), drawn by
textual-serve's terminal emulator; its JavaScript, CSS and fonts come from the installed package,
so no internet is needed. The server binds the loopback address by default: anyone who can reach
the port can look at the runs (and, with live sources, make this machine connect to them), so
another address gets a warning; reach a remote box with ``ssh -L 8000:127.0.0.1:8000`` instead.
"""

from __future__ import annotations

import errno
import shlex
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from stiffmon.sources import session_files
from stiffmon.transport import is_loopback

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


class ServeError(Exception):
    """serve cannot start (missing package, mixed sources, a port it cannot listen on)."""


def bind_error(host: str, port: int, exc: OSError) -> ServeError:
    """``exc`` from listening on ``host:port``, in words with what to do."""
    if exc.errno == errno.EADDRINUSE:
        return ServeError(
            f"port {port} is already in use on {host}: pick another with --port, "
            "or --port 0 for any free one"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return ServeError(f"cannot listen on {host}: not an address of this machine (--host)")
    if exc.errno == errno.EACCES:
        return ServeError(
            f"cannot listen on port {port}: permission denied (ports below 1024 need root); "
            "pick another with --port"
        )
    return ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}")


def listen_port(host: str, port: int) -> int:
    """Check that ``host:port`` can be listened on; return the port (a free one for 0).

    Probes with a socket of its own (with ``SO_REUSEADDR``, as the server's), so a port in use
    is a clear error before anything is printed. A port taken between the probe and the
    server's bind is caught by :func:`serve` as well.

    Raises:
        ServeError: An unknown host, a port in use, or one this user may not listen on.
    """
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ServeError(f"cannot listen on --host {host}: {exc.strerror}") from exc
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(addr)
            probe.listen(1)
        except OSError as exc:
            raise bind_error(host, port, exc) from exc
        return int(probe.getsockname()[1])


def exposure_warning(host: str, port: int) -> str | None:
    """The warning for a non-loopback address (worded as the agent's), None on loopback."""
    if is_loopback(host):
        return None
    return (
        f"stiffmon: serve binds http://{host}:{port}, which is not loopback: any host that can "
        "reach it sees every run, with no authentication. Bind 127.0.0.1 and reach it with "
        f"ssh -L {port}:127.0.0.1:{port} from the machine with the browser."
    )


def app_command(sources: Sequence[str], *, ascii: bool = False, speed: float = 10.0) -> str:
    """The shell command each browser session runs: replay for files, watch otherwise.

    A directory stands for the ``*.stiff`` files in it, as for ``replay``.

    Raises:
        ServeError: Files and live endpoints mixed, a file that does not exist, or a directory
            without session files.
    """
    files: list[Path] = []
    live = 0
    for s in sources:
        if Path(s).exists() or ("://" not in s and ":" not in s):
            try:
                files += session_files(s)
            except FileNotFoundError as exc:
                raise ServeError(str(exc)) from None
        else:
            live += 1
    if files and live:
        raise ServeError("give either session files or live endpoints, not both")
    args = [sys.executable, "-m", "stiffmon"]
    if files:
        args += ["replay", *[str(Path(f).resolve()) for f in files], "--speed", f"{speed:g}"]
    else:
        args += ["watch", *sources]
    if ascii:
        args.append("--ascii")
    return shlex.join(args)


def serve(
    sources: Sequence[str],
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    public_url: str | None = None,
    ascii: bool = False,
    speed: float = 10.0,
) -> None:
    """Serve the monitor on ``http://host:port`` until Ctrl+C (port 0: any free one).

    Raises:
        ServeError: textual-serve is not installed, sources are mixed, or ``host:port`` cannot
            be listened on (in use, not an address of this machine, ...).
    """
    try:
        from textual_serve.server import Server
    except ImportError as exc:
        raise ServeError('serve needs textual-serve: pip install "stiffmon[serve]"') from exc
    command = app_command(sources, ascii=ascii, speed=speed)
    port = listen_port(host, port)
    warning = exposure_warning(host, port)
    if warning:
        print(warning, file=sys.stderr)
    url_host = f"[{host}]" if ":" in host else host
    server = Server(
        command,
        host=host,
        port=port,
        title="stiffmon",
        public_url=public_url or f"http://{url_host}:{port}",
    )
    try:
        server.serve()
    except OSError as exc:  # taken since the probe
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise
        raise bind_error(host, port, exc) from exc
