"""The ``stiffmon`` command line: ``watch``, ``replay``, ``record``, ``summary``, ``demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from stiffmon import __version__

Handler = Callable[[argparse.Namespace], int]


def _not_available(args: argparse.Namespace) -> int:
    print(
        f"stiffmon {args.command}: not available yet in stiffmon {__version__}. "
        "See the README for the commands that exist so far.",
        file=sys.stderr,
    )
    return 2


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
    watch.set_defaults(handler=_not_available)

    replay = sub.add_parser(
        "replay",
        help="replay recorded .stiff sessions in the monitor",
        description="Replay one or more .stiff session files; several files compare as runs.",
    )
    replay.add_argument("files", nargs="+", metavar="FILE", help=".stiff session file")
    replay.add_argument("--follow", action="store_true", help="follow files still being written")
    replay.add_argument("--speed", type=float, default=1.0, help="replay speed (default 1x)")
    replay.add_argument("--ascii", action="store_true", help="plain-ASCII drawing")
    replay.set_defaults(handler=_not_available)

    record = sub.add_parser(
        "record",
        help="record live runs to a .stiff file without the monitor",
        description="Headless recorder: subscribe to live runs and write a .stiff session file.",
    )
    record.add_argument("endpoints", nargs="+", metavar="ENDPOINT", help="tcp:// address")
    record.add_argument("-o", "--output", required=True, help="output .stiff file")
    record.set_defaults(handler=_not_available)

    summary = sub.add_parser(
        "summary",
        help="print a table per run from session files or live endpoints",
        description="Print a summary table per run from .stiff files or live endpoints.",
    )
    summary.add_argument("sources", nargs="+", metavar="SOURCE", help=".stiff file or endpoint")
    summary.add_argument("--json", action="store_true", help="machine-readable JSON output")
    summary.set_defaults(handler=_not_available)

    demo = sub.add_parser(
        "demo",
        help="offline learning-rate sweep on bundled data with the monitor attached",
        description="Train a learning-rate sweep on bundled data (scikit-learn digits) with "
        "agents attached, record every run and show them live in the monitor.",
    )
    demo.add_argument("--runs", type=int, default=3, help="number of runs")
    demo.add_argument("--lrs", type=str, default=None, help="comma-separated learning rates")
    demo.add_argument("--steps", type=int, default=None, help="training steps per run")
    demo.add_argument("--model", choices=("mlp", "cnn"), default="mlp", help="model family")
    demo.add_argument("--label-noise", type=float, default=0.0, help="fraction of random labels")
    demo.add_argument("--no-tui", action="store_true", help="train and record only")
    demo.add_argument("--out", type=str, default=None, help="directory for the .stiff files")
    demo.set_defaults(handler=_not_available)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``stiffmon`` command; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
