"""The handlers of the subcommands that read sessions and print, with no screen: ``summary`` and
``export``.

Like :mod:`stiffmon.commands`, each imports what it needs inside it, so ``stiffmon --help`` stays
fast.
"""

from __future__ import annotations

import argparse
import sys

from stiffmon.commands import curve_client, fail


def cmd_summary(args: argparse.Namespace) -> int:
    import json
    import time

    from rich.console import Console
    from rich.markup import escape

    from stiffmon.client import Client
    from stiffmon.session import read_sessions
    from stiffmon.sources import resolve
    from stiffmon.store import Store
    from stiffmon.summary import summary_json, summary_table

    store = Store()
    resolved = resolve(args.sources, discover=False, ssh_port=args.ssh_port)
    notes: list[str] = []
    dead: list[str] = []
    try:
        msgs, merge = read_sessions(resolved.files, skip_unopened=True)  # the others summarised
        store.extend(msgs, replay=True)
        del msgs
        notes += merge.notes(unopened=False)
        bad = merge.unopened_notes()
        for report in merge.reports.values():
            if report.newer_version is not None and not report.runs:
                dead.append(
                    f"{report.path} holds no run this stiffmon can read (protocol version "
                    f"{report.newer_version}: upgrade stiffmon)"
                )
            elif not report.runs:
                dead.append(f"{report.path} holds no run")
        if store.rejected:
            notes.append(f"{store.rejected} messages could not be stored (malformed)")
        if resolved.endpoints:
            n = len(store.runs)
            with Client(resolved.endpoints, curve=curve_client(args)) as client:
                deadline = time.monotonic() + args.wait
                while time.monotonic() < deadline:
                    for msg, _ in client.poll(0.1):
                        store.apply(msg)
                store.source_malformed += client.stats.malformed
            if len(store.runs) == n:
                from stiffmon.tunnel import tunnel_label

                where = ", ".join(tunnel_label(str(e)) for e in resolved.endpoints)
                dead.append(
                    f"no run answered on {where} within {args.wait:g} s "
                    "(is the agent running? a longer --wait?)"
                )
    finally:
        resolved.close()
    for rd in store.runs.values():
        if rd.dropped:
            notes.append(f"{rd.name}: the agent dropped {rd.dropped} messages")
    if store.runs:
        if args.json:
            rows = summary_json(store)
            for row in rows:
                row["files"] = [str(p) for p in merge.files_of(row["run"])]
            print(json.dumps(rows, indent=2))
            for note in notes:  # stdout stays valid JSON
                print(f"stiffmon summary: {note}", file=sys.stderr)
        else:
            console = Console()
            console.print(summary_table(store))
            for note in notes:
                console.print(f"[yellow]{escape(note)}[/]")
    else:
        for note in notes:
            print(f"stiffmon summary: {note}", file=sys.stderr)
    for d in bad + dead:
        fail(args, d)
    if not store.runs and not dead:  # every file left out as not a session
        return fail(args, "no session to summarise")
    return 2 if dead or not store.runs else 1 if bad else 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stiffmon.export import ExportError, check_out, export, load
    from stiffmon.sources import resolve

    out = Path(args.out)
    try:  # before listening to endpoints for --wait seconds
        check_out(out, args.format, force=args.force)
    except ExportError as exc:
        return fail(args, str(exc))
    resolved = resolve(args.sources, discover=False, ssh_port=args.ssh_port)
    notes: list[str] = []
    bad: list[str] = []  # files that are not sessions: left out, the others exported
    try:
        store = load(
            resolved.files,
            resolved.endpoints,
            wait=args.wait,
            curve=curve_client(args),
            notes=notes,
            unopened=bad,
        )
    finally:
        resolved.close()
    for n in notes:
        print(f"stiffmon export: {n}", file=sys.stderr)
    for b in bad:
        fail(args, b)
    if not store.runs:
        return fail(args, "no run found in the sources", code=2 if bad else 1)
    try:
        paths = export(store, args.format, out, force=args.force)
    except ExportError as exc:
        return fail(args, str(exc))
    except OSError as exc:  # a missing parent, no permission, a full disk
        return fail(args, f"cannot write into --out {out}: {exc.strerror or exc}")
    for path in paths:
        print(path)
    if bad:  # an export that lacks data must not look whole to a script
        what = "1 file" if len(bad) == 1 else f"{len(bad)} files"
        return fail(args, f"{what} left out as not sessions: the export lacks them", code=1)
    return 0
