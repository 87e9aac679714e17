"""The handlers of the ``stiffmon`` subcommands: one ``cmd_<name>(args) -> exit status`` each.

:mod:`stiffmon.cli` builds the parser and dispatches to these. Every import a handler needs is
made inside it, so ``stiffmon --help`` stays fast and no command pays for another's imports.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def fail(args: argparse.Namespace, message: str, code: int = 2) -> int:
    """Print ``stiffmon <command>: <message>`` to stderr and return the exit status ``code``."""
    print(f"stiffmon {args.command}: {message}", file=sys.stderr)
    return code


def no_terminal(args: argparse.Namespace, hint: str = "") -> int | None:
    """Exit status 2 and a message if stdin or stdout is not a terminal (the monitor needs one)."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        return None
    if os.environ.get("TEXTUAL_DRIVER"):  # another driver (stiffmon serve's web driver): no tty
        return None
    which = "stdin" if not sys.stdin.isatty() else "stdout"
    return fail(args, f"the monitor needs a terminal, and {which} is not one{hint}")


def curve_client(args: argparse.Namespace) -> Any:
    """The CURVE client keys named by ``--curve-keys``/``--curve-name``, or None without them."""
    if not getattr(args, "curve_keys", None):
        return None
    from stiffmon.transport import load_curve_client

    return load_keys(load_curve_client, args.curve_keys, args.curve_name)


def load_keys(load: Callable[..., Any], directory: str, *name: str) -> Any:
    """``load(directory, *name)``; a key file missing or unreadable (zmq's ``OSError``, a
    ``ValueError``) raises a :class:`FileNotFoundError` naming the client keys there."""
    try:
        return load(directory, *name)
    except (OSError, ValueError) as exc:
        from pathlib import Path

        names = sorted(p.stem for p in Path(directory).glob("*.key_secret") if p.stem != "server")
        raise FileNotFoundError(
            f"--curve-keys {directory}: {exc} (client keys there: {', '.join(names) or 'none'}; "
            "--curve-name picks one, 'stiffmon keys DIR --clients NAME' makes them)"
        ) from exc


def cmd_record(args: argparse.Namespace) -> int:
    """Record live runs to ``--output``; exit status 2 (as ``summary``) if nothing came.

    A file that this command created and got nothing is removed (an empty session would say
    "holds no run" later, with no hint why); an existing file is left as it was.
    """
    import signal
    import time
    from pathlib import Path

    from stiffmon.recorder import record
    from stiffmon.sources import resolve

    stop = {"flag": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    resolved = resolve(args.endpoints, discover=False, ssh_port=args.ssh_port)
    if resolved.files:
        resolved.close()
        return fail(args, f"record takes live endpoints, not files: {resolved.files[0]}")
    from stiffmon.tunnel import tunnel_label

    where = ", ".join(tunnel_label(str(e)) for e in resolved.endpoints)  # ssh:// source, not ipc://
    output = Path(args.output)
    if output.is_dir():
        resolved.close()
        return fail(args, f"-o {output} is a directory: give a .stiff file to write")
    size = output.stat().st_size if output.exists() else None  # None: this command creates it
    print(f"stiffmon record: {where} -> {output} (Ctrl+C stops)", file=sys.stderr)
    # Ctrl+C stops like SIGTERM, so the counts below are still said
    previous = signal.signal(signal.SIGINT, on_signal)
    started = time.monotonic()
    try:
        written, runs, malformed = record(
            resolved.endpoints,
            output,
            stop=lambda: stop["flag"],
            duration=args.duration,
            until_bye=args.until_bye,
            curve=curve_client(args),
        )
    except KeyboardInterrupt:  # a second Ctrl+C, or one before the handler was set
        written, runs, malformed = -1, set(), 0
    except OSError as exc:
        if exc.filename != str(output):
            raise
        return fail(args, f"cannot write -o {output}: {exc.strerror or exc}")
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
        resolved.close()
    if written == 0:
        if size is None:
            output.unlink(missing_ok=True)
            kept = f"{output} not created"
        else:
            if size == 0:  # it got the file header only
                os.truncate(output, 0)
            kept = f"{output} left as it was"
        return fail(
            args,
            f"nothing received from {where} in {time.monotonic() - started:.1f} s (is the agent "
            f"running? a longer --duration?); {kept}",
        )
    if written > 0:
        print(
            f"stiffmon record: {written} messages from {len(runs)} run(s) written to {output}"
            + (f"; {malformed} malformed frames dropped" if malformed else ""),
            file=sys.stderr,
        )
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from stiffmon.sources import resolve
    from stiffmon.tui.app import StiffmonApp
    from stiffmon.tui.sources import LiveSource

    resolved = resolve(args.endpoints, discover=True, ssh_port=args.ssh_port)
    if resolved.files:
        resolved.close()
        return fail(
            args,
            f"watch takes live endpoints; replay files with: stiffmon replay {resolved.files[0]}",
        )
    failed = no_terminal(
        args, " (for a table without one: stiffmon summary ENDPOINT, or record -o FILE)"
    )
    if failed is not None:
        resolved.close()
        return failed
    try:
        live = LiveSource(resolved.endpoints, curve_client(args), discover=not args.endpoints)
        StiffmonApp(live=live, ascii=args.ascii).run()
    finally:
        resolved.close()
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    import math
    from pathlib import Path

    from stiffmon.sources import resolve
    from stiffmon.tui.app import StiffmonApp
    from stiffmon.tui.sources import ReplaySource

    files = resolve(args.files, discover=False, files_only=True).files
    speed = math.inf if args.speed is not None and args.speed <= 0 else args.speed
    source = ReplaySource(
        files, follow=args.follow, speed=speed or 1.0, at_end=bool(args.screenshots)
    )
    source.load()  # each file opened and read once; one that is not a session is noted
    if set(files) <= set(source.unopened):  # a clear error before the screen opens
        bad = [f"{path}: {why}" for path, why in source.unopened.items()]
        for why in bad[:-1]:  # else the others open, and the screen names the rest
            print(f"stiffmon replay: {why}", file=sys.stderr)
        return fail(args, bad[-1])
    if not args.screenshots:
        failed = no_terminal(args, " (--screenshots DIR saves SVGs without one)")
        if failed is not None:
            return failed
    if not source.messages and not args.follow:
        for note in source.notes:
            print(f"stiffmon replay: {note}", file=sys.stderr)
        return fail(args, "no message could be read from " + ", ".join(map(str, files)))
    if args.screenshots:  # no screen to show them on: say them here too
        for note in source.notes:
            print(f"stiffmon replay: {note}", file=sys.stderr)
    if speed is None:
        source.speed = source.auto_speed()
    if args.screenshots:
        out = Path(args.screenshots)
        out.mkdir(parents=True, exist_ok=True)
        cols, rows = args.size  # parsed and checked by the parser
        app = StiffmonApp(replay=source, ascii=args.ascii, screenshot_dir=out, shoot_views=True)
        app.run(headless=True, size=(cols, rows))
        for shot in app.shots:
            print(shot)
        return 0
    StiffmonApp(replay=source, ascii=args.ascii).run()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from stiffmon.demo import DemoError, run_demo

    if not args.no_tui:
        failed = no_terminal(args, " (--no-tui trains with progress bars instead)")
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
        return fail(args, str(exc))


def cmd_keys(args: argparse.Namespace) -> int:
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
        return fail(
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


def cmd_relay(args: argparse.Namespace) -> int:
    import time

    from stiffmon.relay import Relay

    curve_upstream = curve_bind = None
    if args.curve_keys:
        from stiffmon.transport import load_curve_client, load_curve_server

        curve_upstream = load_keys(load_curve_client, args.curve_keys, args.curve_name)
        curve_bind = load_keys(load_curve_server, args.curve_keys)
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


def cmd_serve(args: argparse.Namespace) -> int:
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
        return fail(args, str(exc))
    return 0
