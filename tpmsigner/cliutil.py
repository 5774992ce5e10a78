"""Code shared by the ``tpmsigner`` and ``tpmsigner-agent`` programs: logging, errors, signals."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Awaitable, Callable

from .errors import TpmSignerError
from .logsetup import configure_logging, level_for
from .printable import escape_nonprintable


def add_verbosity_options(parser: argparse.ArgumentParser, *, subcommand: bool = False) -> None:
    """Add -v (debug messages) and -q (warnings and errors only).

    A subcommand's copy has no default, so that ``-v`` given before the
    subcommand is not reset by the subcommand's own parser.
    """
    default: object = argparse.SUPPRESS if subcommand else False
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default, help="log debug messages")
    group.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="log only warnings and errors"
    )


def run_handler(program: str, args: argparse.Namespace) -> int:
    """Set up logging, run ``args.handler``, and turn expected errors into one line."""
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    if verbose and quiet:
        print(f"{program}: error: -v and -q cannot be used together", file=sys.stderr)
        return 2
    configure_logging(level_for(verbose, quiet))
    try:
        return args.handler(args)
    except (TpmSignerError, ValueError) as exc:
        # A message may quote a peer, such as the reason of a refused pairing.
        print(f"{program}: error: {escape_nonprintable(str(exc))}", file=sys.stderr)
        return 1
    except OSError as exc:
        # A file or socket the command needs: the path and the reason are
        # what a person can act on.
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"{program}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def serve_until_signal(
    start: Callable[[], Awaitable[None]],
    close: Callable[[], Awaitable[None]],
    signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM),
) -> None:
    """Run an asyncio server: ``start()``, wait for one of ``signals``, then ``close()``."""

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signal_number in signals:
            loop.add_signal_handler(signal_number, stop.set)
        await start()
        try:
            await stop.wait()
        finally:
            await close()

    asyncio.run(run())


def print_json(value: object) -> None:
    """Print ``value`` as indented JSON with sorted keys."""
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Print rows as left-aligned columns separated by two spaces, with control characters escaped."""
    if not rows:
        return
    rows = [tuple(escape_nonprintable(cell) for cell in row) for row in rows]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        print("  ".join(cells).rstrip())


def add_audit_parser(commands, default_file: str) -> argparse.ArgumentParser:
    """Add the ``audit [show|verify]`` subcommand that both programs have; ``default_file`` is named in its help."""
    audit = commands.add_parser("audit", help="print the audit log, or check it with 'audit verify'")
    audit.add_argument(
        "action",
        nargs="?",
        choices=["show", "verify"],
        default="show",
        help="show: print the entries (the default); verify: check the hash chain and name the first line "
        "that breaks it",
    )
    audit.add_argument("--file", help=f"audit log file (default: {default_file})")
    audit.add_argument("--since", help="only entries at or after this ISO 8601 time, e.g. 2026-12-04T10:00")
    audit.add_argument("--json", action="store_true", help="print JSON lines as stored")
    return audit
