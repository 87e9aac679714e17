"""The ``stiffmon`` command line: ``watch``, ``replay``, ``record``, ``summary``, ``demo``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from stiffmon import __version__

Handler = Callable[[argparse.Namespace], int]


def _fail(args: argparse.Namespace, message: str, code: int = 2) -> int:
    print(f"stiffmon {args.command}: {message}", file=sys.stderr)
    return code


def _no_terminal(args: argparse.Namespace, hint: str = "") -> int | None:
    """Exit status 2 and a message if stdin or stdout is not a terminal (the monitor needs one)."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        return None
    if os.environ.get("TEXTUAL_DRIVER"):  # another driver (stiffmon serve's web driver): no tty
        return None
    which = "stdin" if not sys.stdin.isatty() else "stdout"
    return _fail(args, f"the monitor needs a terminal, and {which} is not one{hint}")


def _curve_client(args: argparse.Namespace) -> Any:
    if not getattr(args, "curve_keys", None):
        return None
    from stiffmon.transport import load_curve_client

    return load_curve_client(args.curve_keys, args.curve_name)


def _cmd_record(args: argparse.Namespace) -> int:
    import signal

    from stiffmon.recorder import record
    from stiffmon.sources import resolve

    stop = {"flag": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    resolved = resolve(args.endpoints, discover=False, ssh_port=args.ssh_port)
    if resolved.files:
        resolved.close()
        return _fail(args, f"record takes live endpoints, not files: {resolved.files[0]}")
    where = ", ".join(map(str, resolved.endpoints))
    print(f"stiffmon record: {where} -> {args.output} (Ctrl+C stops)", file=sys.stderr)
    try:
        written, runs, malformed = record(
            resolved.endpoints,
            args.output,
            stop=lambda: stop["flag"],
            duration=args.duration,
            until_bye=args.until_bye,
            curve=_curve_client(args),
        )
    except KeyboardInterrupt:
        written, runs, malformed = -1, set(), 0
    finally:
        resolved.close()
    if written >= 0:
        print(
            f"stiffmon record: {written} messages from {len(runs)} run(s) written to {args.output}"
            + (f"; {malformed} malformed frames dropped" if malformed else ""),
            file=sys.stderr,
        )
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    import json
    import time

    from rich.console import Console

    from stiffmon.client import Client
    from stiffmon.session import SessionReader
    from stiffmon.sources import resolve
    from stiffmon.store import Store
    from stiffmon.summary import summary_json, summary_table

    store = Store()
    resolved = resolve(args.sources, discover=False, ssh_port=args.ssh_port)
    notes: list[str] = []
    dead: list[str] = []
    try:
        for path in resolved.files:
            reader = SessionReader(path)
            n = len(store.runs)
            store.extend(reader.messages(on_error="skip"), replay=True)
            if reader.ignored_bytes:
                notes.append(f"{path}: ignored a torn tail of {reader.ignored_bytes} bytes")
            if reader.skipped_records:
                notes.append(f"{path}: skipped {reader.skipped_records} malformed records")
            if len(store.runs) == n:
                dead.append(f"{path} holds no run")
        if resolved.endpoints:
            n = len(store.runs)
            with Client(resolved.endpoints, curve=_curve_client(args)) as client:
                deadline = time.monotonic() + args.wait
                while time.monotonic() < deadline:
                    for msg, _ in client.poll(0.1):
                        store.apply(msg)
                store.source_malformed += client.stats.malformed
            if len(store.runs) == n:
                where = ", ".join(map(str, resolved.endpoints))
                dead.append(
                    f"no run answered on {where} within {args.wait:g} s "
                    "(is the agent running? a longer --wait?)"
                )
    finally:
        resolved.close()
    if store.runs:
        if args.json:
            print(json.dumps(summary_json(store), indent=2))
        else:
            console = Console()
            console.print(summary_table(store))
            for rd in store.runs.values():
                if rd.dropped:
                    notes.append(f"{rd.name}: the agent dropped {rd.dropped} messages")
            for note in notes:
                console.print(f"[yellow]{note}[/]")
    for d in dead:
        _fail(args, d)
    return 2 if dead else 0


def _cmd_watch(args: argparse.Namespace) -> int:
    from stiffmon.sources import resolve
    from stiffmon.tui.app import StiffmonApp
    from stiffmon.tui.sources import LiveSource

    resolved = resolve(args.endpoints, discover=True, ssh_port=args.ssh_port)
    if resolved.files:
        resolved.close()
        return _fail(
            args,
            f"watch takes live endpoints; replay files with: stiffmon replay {resolved.files[0]}",
        )
    failed = _no_terminal(
        args, " (for a table without one: stiffmon summary ENDPOINT, or record -o FILE)"
    )
    if failed is not None:
        resolved.close()
        return failed
    try:
        live = LiveSource(resolved.endpoints, _curve_client(args), discover=not args.endpoints)
        StiffmonApp(live=live, ascii=args.ascii).run()
    finally:
        resolved.close()
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    import math
    from pathlib import Path

    from stiffmon.session import SessionReader
    from stiffmon.sources import resolve
    from stiffmon.tui.app import StiffmonApp
    from stiffmon.tui.sources import ReplaySource

    files = resolve(args.files, discover=False, files_only=True).files
    for f in files:
        SessionReader(f)  # wrong magic / version: a clear error before the screen opens
    if not args.screenshots:
        failed = _no_terminal(args, " (--screenshots DIR saves SVGs without one)")
        if failed is not None:
            return failed
    speed = math.inf if args.speed is not None and args.speed <= 0 else args.speed
    source = ReplaySource(
        files, follow=args.follow, speed=speed or 1.0, at_end=bool(args.screenshots)
    )
    source.load()
    if speed is None:
        source.speed = source.auto_speed()
    if args.screenshots:
        out = Path(args.screenshots)
        out.mkdir(parents=True, exist_ok=True)
        try:
            cols, rows = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            return _fail(args, f"--size must look like 120x36, got {args.size!r}")
        app = StiffmonApp(replay=source, ascii=args.ascii, screenshot_dir=out, shoot_views=True)
        app.run(headless=True, size=(cols, rows))
        for shot in app.shots:
            print(shot)
        return 0
    StiffmonApp(replay=source, ascii=args.ascii).run()
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from stiffmon.demo import DemoError, run_demo

    if not args.no_tui:
        failed = _no_terminal(args, " (--no-tui trains with progress bars instead)")
        if failed is not None:
            return failed
    try:
        return run_demo(
            runs=args.runs,
            lrs=args.lrs,
            steps=args.steps,
            model=args.model,
            label_noise=args.label_noise,
            no_tui=args.no_tui,
            out=args.out,
            batch_size=args.batch_size,
            momentum=args.momentum,
            ascii=args.ascii,
            every=args.every,
        )
    except DemoError as exc:
        return _fail(args, str(exc))


def _cmd_keys(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stiffmon.transport import make_keys

    names = ["server", *args.clients]
    existing = [
        str(Path(args.directory) / f"{n}{ext}")
        for n in names
        for ext in (".key", ".key_secret")
        if (Path(args.directory) / f"{n}{ext}").exists()
    ]
    if existing and not args.force:
        return _fail(
            args,
            f"{existing[0]} already exists: agents and monitors using these keys would be locked "
            "out. Use another directory, or --force to replace them",
        )
    d = make_keys(args.directory, tuple(args.clients))
    print(
        f"CURVE keys written to {d}: give the agent Agent(..., curve_keys='{d}') and the monitor "
        f"--curve-keys {d}; copy <client>.key_secret and server.key to each monitor machine."
    )
    return 0


def _cmd_relay(args: argparse.Namespace) -> int:
    import time

    from stiffmon.relay import Relay

    curve_upstream = curve_bind = None
    if args.curve_keys:
        from stiffmon.transport import load_curve_client, load_curve_server

        curve_upstream = load_curve_client(args.curve_keys, args.curve_name)
        curve_bind = load_curve_server(args.curve_keys)
    relay_ = Relay(args.upstream, args.bind, curve_upstream=curve_upstream, curve_bind=curve_bind)
    with relay_.start() as relay:
        print(
            f"stiffmon relay: {len(relay.upstream)} upstream -> {relay.endpoint} (Ctrl+C stops)",
            file=sys.stderr,
        )
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stiffmon.export import ExportError, export, load
    from stiffmon.sources import resolve

    resolved = resolve(args.sources, discover=False, ssh_port=args.ssh_port)
    notes: list[str] = []
    try:
        store = load(
            resolved.files,
            resolved.endpoints,
            wait=args.wait,
            curve=_curve_client(args),
            notes=notes,
        )
    finally:
        resolved.close()
    for n in notes:
        print(f"stiffmon export: {n}", file=sys.stderr)
    if not store.runs:
        return _fail(args, "no run found in the sources", code=1)
    try:
        paths = export(store, args.format, Path(args.out))
    except ExportError as exc:
        return _fail(args, str(exc))
    for path in paths:
        print(path)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from stiffmon.serve import ServeError, serve

    try:
        serve(
            args.sources,
            host=args.host,
            port=args.port,
            public_url=args.public_url,
            ascii=args.ascii,
            speed=args.speed,
        )
    except ServeError as exc:
        return _fail(args, str(exc))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="stiffmon",
        description="Live monitor for stiffness, sharpness and gradient noise of training runs.",
    )
    parser.add_argument("--version", action="version", version=f"stiffmon {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    watch = sub.add_parser(
        "watch",
        help="attach the monitor to live runs",
        description="Attach the terminal monitor to live runs: local ones are discovered, or "
        "give endpoints (tcp://host:port) or ssh://[user@]host[:port] to tunnel to a remote run.",
    )
    watch.add_argument("endpoints", nargs="*", metavar="ENDPOINT", help="tcp:// or ssh:// address")
    watch.add_argument("--ascii", action="store_true", help="plain-ASCII drawing")
    _add_remote_options(watch)
    watch.set_defaults(handler=_cmd_watch)

    replay = sub.add_parser(
        "replay",
        help="replay recorded .stiff sessions in the monitor",
        description="Replay one or more .stiff session files; several files compare as runs.",
    )
    replay.add_argument(
        "files", nargs="+", metavar="FILE", help=".stiff session file or a directory of them"
    )
    replay.add_argument("--follow", action="store_true", help="follow files still being written")
    replay.add_argument(
        "--speed",
        type=float,
        default=None,
        help="replay speed, x recorded time (default: the whole session in about 20 s, at "
        "least 1x; 0: as fast as possible)",
    )
    replay.add_argument("--ascii", action="store_true", help="plain-ASCII drawing")
    replay.add_argument(
        "--screenshots",
        metavar="DIR",
        default=None,
        help="save an SVG of every view into DIR and exit (no terminal needed)",
    )
    replay.add_argument("--size", default="120x36", help="terminal size for --screenshots")
    replay.set_defaults(handler=_cmd_replay)

    record = sub.add_parser(
        "record",
        help="record live runs to a .stiff file without the monitor",
        description="Headless recorder: subscribe to live runs and write a .stiff session file.",
    )
    record.add_argument("endpoints", nargs="+", metavar="ENDPOINT", help="tcp:// address")
    record.add_argument("-o", "--output", required=True, help="output .stiff file")
    record.add_argument("--duration", type=float, default=None, help="stop after SECONDS")
    record.add_argument("--until-bye", action="store_true", help="stop when every run has ended")
    _add_remote_options(record)
    record.set_defaults(handler=_cmd_record)

    summary = sub.add_parser(
        "summary",
        help="print a table per run from session files or live endpoints",
        description="Print a summary table per run from .stiff files or live endpoints.",
    )
    summary.add_argument(
        "sources", nargs="+", metavar="SOURCE", help=".stiff file, directory of them, or endpoint"
    )
    summary.add_argument("--json", action="store_true", help="machine-readable JSON output")
    summary.add_argument("--wait", type=float, default=2.0, help="seconds to listen to endpoints")
    _add_remote_options(summary)
    summary.set_defaults(handler=_cmd_summary)

    keys = sub.add_parser(
        "keys",
        help="create CURVE keys for authenticated direct TCP",
        description="Create a server key pair and client key pairs for CURVE authentication.",
    )
    keys.add_argument("directory", help="where to write the keys")
    keys.add_argument("--clients", nargs="+", default=["client"], help="client key names")
    keys.add_argument("--force", action="store_true", help="replace existing keys")
    keys.set_defaults(handler=_cmd_keys)

    relay = sub.add_parser(
        "relay",
        help="fan many agents in to one address",
        description="Forward the updates and snapshots of many agents through one address.",
    )
    relay.add_argument("upstream", nargs="+", metavar="ENDPOINT", help="agent tcp:// address")
    relay.add_argument("--bind", default="tcp://127.0.0.1:5655", help="address for monitors")
    relay.add_argument(
        "--curve-keys",
        default=None,
        help="directory from 'stiffmon keys': CURVE to the agents (client keys) and for "
        "monitors (server key, authorized/)",
    )
    relay.add_argument("--curve-name", default="client", help="client key name in that directory")
    relay.set_defaults(handler=_cmd_relay)

    demo = sub.add_parser(
        "demo",
        help="offline learning-rate sweep on bundled data with the monitor attached",
        description="Train a learning-rate sweep on bundled data (scikit-learn digits) with "
        "agents attached, record every run and show them live in the monitor.",
    )
    demo.add_argument("--runs", type=int, default=3, help="number of runs")
    demo.add_argument("--lrs", type=str, default=None, help="comma-separated learning rates")
    demo.add_argument("--steps", type=int, default=None, help="steps per run (mlp 3000, cnn 1200)")
    demo.add_argument("--model", choices=("mlp", "cnn"), default="mlp", help="model family")
    demo.add_argument("--label-noise", type=float, default=0.0, help="fraction of random labels")
    demo.add_argument("--no-tui", action="store_true", help="train and record only")
    demo.add_argument("--out", type=str, default=None, help="directory for the .stiff files")
    demo.add_argument("--batch-size", type=int, default=64, help="batch size (0: full-batch GD)")
    demo.add_argument("--momentum", type=float, default=0.0, help="heavy-ball momentum")
    demo.add_argument("--every", type=int, default=20, help="steps between heavy measurements")
    demo.add_argument("--ascii", action="store_true", help="plain-ASCII drawing")
    demo.set_defaults(handler=_cmd_demo)

    export = sub.add_parser(
        "export",
        help="export runs to CSV, Parquet or TensorBoard event files",
        description="Export session files or live runs: tidy tables (csv, parquet) or "
        "TensorBoard event files (scalars, class-stiffness heatmaps, spectra as histograms).",
    )
    export.add_argument("sources", nargs="+", metavar="SOURCE", help=".stiff file or endpoint")
    export.add_argument(
        "--format", choices=("csv", "parquet", "tensorboard"), default="csv", help="output format"
    )
    export.add_argument("--out", required=True, metavar="DIR", help="output directory")
    export.add_argument("--wait", type=float, default=2.0, help="seconds to listen to endpoints")
    _add_remote_options(export)
    export.set_defaults(handler=_cmd_export)

    serve = sub.add_parser(
        "serve",
        help="serve the monitor to a browser tab",
        description="Serve the monitor over HTTP with textual-serve: replay for session files, "
        "watch for live endpoints (or the local runs). Loopback only unless --host says so.",
    )
    serve.add_argument("sources", nargs="*", metavar="SOURCE", help=".stiff files or endpoints")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--public-url", default=None, help="URL browsers use, behind a proxy")
    serve.add_argument("--speed", type=float, default=10.0, help="replay speed")
    serve.add_argument("--ascii", action="store_true", help="plain-ASCII drawing")
    serve.set_defaults(handler=_cmd_serve)
    return parser


def _add_remote_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curve-keys", default=None, help="directory with CURVE client keys")
    p.add_argument("--curve-name", default="client", help="client key name in that directory")
    p.add_argument("--ssh-port", type=int, default=None, help="SSH port for ssh:// sources")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``stiffmon`` command; return its exit status."""
    from stiffmon.session import SessionError
    from stiffmon.transport import EndpointError
    from stiffmon.tunnel import TunnelError

    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `stiffmon summary --json | head`: the reader left, so do we
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        return 141
    except (SessionError, EndpointError, TunnelError, FileNotFoundError, PermissionError) as exc:
        return _fail(args, str(exc))
