"""Code shared by the ``tpmsigner`` and ``tpmsigner-agent`` programs: logging, errors, signals."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Awaitable, Callable

from .errors import TpmSignerError


def run_handler(program: str, args: argparse.Namespace) -> int:
    """Set up logging, run ``args.handler``, and turn expected errors into one line."""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.handler(args)
    except (TpmSignerError, ValueError) as exc:
        print(f"{program}: error: {exc}", file=sys.stderr)
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
