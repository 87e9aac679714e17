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
    sources: Sequence[str], *, discover: bool = True, ssh_port: int | None = None
) -> Resolved:
    """Resolve sources; with none given (and ``discover``), the locally registered runs.

    Raises:
        stiffmon.transport.EndpointError: A malformed tcp:// address.
        stiffmon.tunnel.TunnelError: ssh failed.
        FileNotFoundError: A file that does not exist.
    """
    out = Resolved()
    try:
        for src in sources:
            if src.startswith("ssh://"):
                tunnel = Tunnel(src, ssh_port=ssh_port)
                out.tunnels.append(tunnel)
                out.endpoints.append(tunnel.endpoint)
            elif src.startswith("tcp://") or (":" in src and not Path(src).exists()):
                out.endpoints.append(parse_endpoint(src))
            else:
                path = Path(src)
                if not path.is_file():
                    raise FileNotFoundError(f"no such session file: {src}")
                out.files.append(path)
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
