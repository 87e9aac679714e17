"""Turn command-line sources (files, tcp://, ssh://, nothing) into endpoints and readers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stiffmon.registry import list_runs
from stiffmon.transport import Endpoint, parse_endpoint
from stiffmon.tunnel import Tunnel


@dataclass
class Resolved:
    """Endpoints to subscribe to, session files to read, and tunnels to close afterwards."""

    endpoints: list[Endpoint] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    tunnels: list[Tunnel] = field(default_factory=list)

    def close(self) -> None:
        for t in self.tunnels:
            t.close()


def resolve(
    sources: Sequence[str],
    *,
    discover: bool = True,
    ssh_port: int | None = None,
    files_only: bool = False,
) -> Resolved:
    """Resolve sources; with none given (and ``discover``), the locally registered runs.

    A directory stands for the ``*.stiff`` files in it (sorted by name). With ``files_only``
    every source is a file or directory, even one that looks like ``host:port``.

    Raises:
        stiffmon.transport.EndpointError: A malformed tcp:// address.
        stiffmon.tunnel.TunnelError: ssh failed.
        FileNotFoundError: A file that does not exist, or a directory without ``.stiff`` files.
    """
    out = Resolved()
    try:
        for src in sources:
            if not files_only and src.startswith("ssh://"):
                tunnel = Tunnel(src, ssh_port=ssh_port)
                out.tunnels.append(tunnel)
                out.endpoints.append(tunnel.endpoint)
            elif not files_only and (
                src.startswith("tcp://") or (":" in src and not Path(src).exists())
            ):
                out.endpoints.append(parse_endpoint(src))
            else:
                out.files.extend(session_files(src))
        if not sources and discover:
            seen: set[str] = set()
            for entry in list_runs():
                if entry.endpoint not in seen:
                    seen.add(entry.endpoint)
                    out.endpoints.append(parse_endpoint(entry.endpoint))
    except BaseException:
        out.close()
        raise
    return out


def session_files(src: str) -> list[Path]:
    """``src`` if it is a file; the ``*.stiff`` files in it if it is a directory.

    Raises:
        FileNotFoundError: Neither, or a directory without ``.stiff`` files.
    """
    path = Path(src)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.stiff") if p.is_file())
        if not files:
            raise FileNotFoundError(f"no .stiff session files in the directory {src}")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"no such session file: {src}")
    return [path]
