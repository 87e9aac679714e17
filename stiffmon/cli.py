"""The ``stiffmon`` command line: ``watch``, ``replay``, ``record``, ``summary``, ``demo``, ...

This module builds the parser and dispatches; the handlers live in :mod:`stiffmon.commands` and
:mod:`stiffmon.report_commands` (summary, export), the argument types and the subcommand parser
class in :mod:`stiffmon.cli_parsing`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from functools import partial

from stiffmon import __version__
from stiffmon.cli_parsing import (
    COUNT,
    MOMENTUM,
    PORT,
    SECONDS,
    SPEED,
    SSH_PORT,
    CommandParser,
    number,
    screen_size,
)
from stiffmon.commands import (
    Handler,
    cmd_demo,
    cmd_keys,
    cmd_record,
    cmd_relay,
    cmd_replay,
    cmd_serve,
    cmd_watch,
    fail,
    no_terminal,
)
from stiffmon.report_commands import cmd_export, cmd_summary

# the names these had when they lived here (tests and callers use them)
_fail = fail
_no_terminal = no_terminal


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="stiffmon",
        description="Live monitor for stiffness, sharpness and gradient noise of training runs.",
    )
    parser.add_argument("--version", action="version", version=f"stiffmon {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
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
    watch.set_defaults(handler=cmd_watch)

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
        type=SPEED,
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
    replay.add_argument(
        "--size",
        type=screen_size,
        default="120x36",
        metavar="COLSxROWS",
        help="terminal size for --screenshots (default: %(default)s)",
    )
    replay.set_defaults(handler=cmd_replay)

    record = sub.add_parser(
        "record",
        help="record live runs to a .stiff file without the monitor",
        description="Headless recorder: subscribe to live runs and write a .stiff session file "
        "(appended to if it exists). Exit status 2 if nothing was received; a file it created "
        "for nothing is removed.",
    )
    record.add_argument(
        "endpoints",
        nargs="+",
        metavar="ENDPOINT",
        help="live run: tcp://host:port (or host:port, :port) or ssh://[user@]host[:port]",
    )
    record.add_argument("-o", "--output", required=True, help="output .stiff file")
    record.add_argument(
        "--duration",
        type=number(float, 0, above=True),
        default=None,
        metavar="SECONDS",
        help="stop after SECONDS (default: until Ctrl+C, or --until-bye)",
    )
    record.add_argument("--until-bye", action="store_true", help="stop when every run has ended")
    _add_remote_options(record)
    record.set_defaults(handler=cmd_record)

    summary = sub.add_parser(
        "summary",
        help="print a table per run from session files or live endpoints",
        description="Print a summary table per run from .stiff files or live endpoints.",
    )
    summary.add_argument(
        "sources", nargs="+", metavar="SOURCE", help=".stiff file, directory of them, or endpoint"
    )
    summary.add_argument("--json", action="store_true", help="machine-readable JSON output")
    _add_wait(summary)
    _add_remote_options(summary)
    summary.set_defaults(handler=cmd_summary)

    keys = sub.add_parser(
        "keys",
        help="create CURVE keys for authenticated direct TCP",
        description="Create a server key pair and client key pairs for CURVE authentication.",
    )
    keys.add_argument("directory", help="where to write the keys")
    keys.add_argument("--clients", nargs="+", default=["client"], help="client key names")
    keys.add_argument("--force", action="store_true", help="replace existing keys")
    keys.set_defaults(handler=cmd_keys)

    relay = sub.add_parser(
        "relay",
        help="fan many agents in to one address",
        description="Forward the updates and snapshots of many agents through one address.",
    )
    relay.add_argument("upstream", nargs="+", metavar="ENDPOINT", help="agent tcp:// address")
    relay.add_argument(
        "--bind", default="tcp://127.0.0.1:5655", help="address for monitors (default: %(default)s)"
    )
    relay.add_argument(
        "--curve-keys",
        default=None,
        help="directory from 'stiffmon keys': CURVE to the agents (client keys) and for "
        "monitors (server key, authorized/)",
    )
    relay.add_argument("--curve-name", default="client", help="client key name in that directory")
    relay.set_defaults(handler=cmd_relay)

    demo = sub.add_parser(
        "demo",
        help="offline learning-rate sweep on bundled data with the monitor attached",
        description="Train a learning-rate sweep on bundled data (scikit-learn digits) with "
        "agents attached, record every run and show them live in the monitor.",
    )
    demo.add_argument(
        "--runs", type=COUNT, default=None, help="number of runs (default 3, or one per --lrs)"
    )
    demo.add_argument(
        "--lrs", type=str, default=None, help="comma-separated learning rates, one run each"
    )
    demo.add_argument(
        "--steps", type=COUNT, default=None, help="steps per run (default: mlp 3000, cnn 1200)"
    )
    demo.add_argument(
        "--model",
        choices=("mlp", "cnn"),
        default="mlp",
        help="model family (default: %(default)s)",
    )
    demo.add_argument(
        "--label-noise",
        type=number(float, 0, 1),
        default=0.0,
        help="fraction of random labels (default: %(default)s)",
    )
    demo.add_argument(
        "--no-tui",
        action="store_true",
        help="no monitor: train and record with progress bars, then print the summary table",
    )
    demo.add_argument("--out", type=str, default=None, help="directory for the .stiff files")
    demo.add_argument(
        "--batch-size",
        type=number(int, 0, note=" (0: full-batch GD)"),
        default=64,
        help="batch size (default: %(default)s; 0: full-batch GD)",
    )
    demo.add_argument(
        "--momentum",
        type=MOMENTUM,
        default=0.0,
        help="heavy-ball momentum, 0 <= beta < 1 (default: %(default)s)",
    )
    demo.add_argument(
        "--every",
        type=COUNT,
        default=20,
        help="steps between heavy measurements (default: %(default)s)",
    )
    demo.add_argument("--ascii", action="store_true", help="plain-ASCII drawing")
    demo.set_defaults(handler=cmd_demo, check=partial(check_demo_args, demo))

    export = sub.add_parser(
        "export",
        help="export runs to CSV, Parquet or TensorBoard event files",
        description="Export session files or live runs: tidy tables (csv, parquet) or "
        "TensorBoard event files (scalars, class-stiffness heatmaps, spectra as histograms).",
    )
    export.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help=".stiff file, directory of them, or live endpoint (tcp:// or ssh://)",
    )
    export.add_argument(
        "--format",
        choices=("csv", "parquet", "tensorboard"),
        default="csv",
        help="output format (default: %(default)s)",
    )
    export.add_argument(
        "--out", required=True, metavar="DIR", help="output directory (made if missing)"
    )
    export.add_argument(
        "--force",
        action="store_true",
        help="replace the files of an earlier export in --out (without it, any file this "
        "export would write that exists already is an error, and nothing is written)",
    )
    _add_wait(export)
    _add_remote_options(export)
    export.set_defaults(handler=cmd_export)

    serve = sub.add_parser(
        "serve",
        help="serve the monitor to a browser tab",
        description="Serve the monitor over HTTP with textual-serve: replay for session files, "
        "watch for live endpoints (or the local runs). Loopback only unless --host says so.",
    )
    serve.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help=".stiff files, or live endpoints (default: the local runs)",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    serve.add_argument(
        "--port",
        type=PORT,
        default=8000,
        help="port to listen on (default: %(default)s; 0: any free port)",
    )
    serve.add_argument("--public-url", default=None, help="URL browsers use, behind a proxy")
    serve.add_argument(
        "--speed",
        type=SPEED,
        default=10.0,
        help="replay speed, x recorded time (default: %(default)s; 0: as fast as possible)",
    )
    serve.add_argument("--ascii", action="store_true", help="plain-ASCII drawing")
    serve.set_defaults(handler=cmd_serve)
    return parser


def _add_wait(p: argparse.ArgumentParser) -> None:
    text = "how long to listen to endpoints (default: %(default)s)"
    p.add_argument("--wait", type=SECONDS, default=2.0, metavar="SECONDS", help=text)


def _add_remote_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curve-keys", default=None, help="directory with CURVE client keys")
    p.add_argument("--curve-name", default="client", help="client key name in that directory")
    p.add_argument("--ssh-port", type=SSH_PORT, default=None, help="SSH port for ssh:// sources")


def check_demo_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject ``--runs`` and ``--lrs`` that disagree, as a usage error (exit 2).

    Args:
        parser: The ``demo`` sub-parser (its usage is printed with the error).
        args: The parsed arguments.
    """
    if args.runs is None or not args.lrs:
        return
    n = len([x for x in args.lrs.split(",") if x.strip()])  # the numbers are checked later
    if n != args.runs:
        parser.error(
            f"--runs {args.runs} but --lrs gives {n} learning rate{'s' * (n != 1)} ({args.lrs}): "
            "--lrs makes one run per rate, so give only one of them, or make them agree"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``stiffmon`` command; return its exit status."""
    from stiffmon.session import SessionError
    from stiffmon.transport import EndpointError
    from stiffmon.tunnel import TunnelError

    parser = build_parser()
    args = parser.parse_args(argv)
    check: Callable[[argparse.Namespace], None] | None = getattr(args, "check", None)
    if check is not None:  # what argparse cannot say: options that contradict each other
        check(args)
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
        return fail(args, str(exc))
