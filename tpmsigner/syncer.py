"""fsync appended files on a thread of their own, off the request path.

An audit record is written to its file before the reply that it records is
sent, so it survives a crash of the process at once.  Only a crash of the
whole system or a power loss can still lose it, until the data reaches the
disk; waiting for that (fsync) took longer than the TPM's signature on a
busy disk, and it blocked the event loop of the signer and the agent.  A
``BackgroundSync`` thread calls fsync as soon as a file was written, for
every write since its last call at once, so the window is the time one
fsync takes.  Anyone able to crash the host at that instant could also
edit the log, which the hash chain does not prevent either (see
tpmsigner/audit.py).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0
# A thread with nothing to sync for this long exits; the next request starts another.
IDLE_EXIT_SECONDS = 5.0


class BackgroundSync:
    """A daemon thread that fsyncs the files named to ``request``."""

    def __init__(self, name: str = "fsync", idle_exit: float = IDLE_EXIT_SECONDS) -> None:
        self._name = name
        self._idle_exit = idle_exit
        self._condition = threading.Condition()
        self._pending: set[Path] = set()
        self._syncing = False
        self._thread: threading.Thread | None = None

    def request(self, path: Path) -> None:
        """Have ``path`` fsynced soon; returns at once."""
        with self._condition:
            self._pending.add(path)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._condition.notify()

    def flush(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Wait until every requested file was fsynced; return False on timeout."""
        with self._condition:
            return self._condition.wait_for(lambda: not self._pending and not self._syncing, timeout)

    def is_running(self) -> bool:
        """Return whether a sync thread exists right now."""
        with self._condition:
            return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._condition:
                if not self._condition.wait_for(lambda: self._pending, self._idle_exit):
                    # request() starts a new thread under the same lock.
                    self._thread = None
                    return
                paths, self._pending = self._pending, set()
                self._syncing = True
            try:
                for path in paths:
                    sync_file(path)
            finally:
                with self._condition:
                    self._syncing = False
                    self._condition.notify_all()


def sync_file(path: Path) -> None:
    """fsync ``path``; a file that is gone (rotated and removed) needs nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        logger.error("cannot flush %s to disk: %s", path, exc)
    finally:
        os.close(fd)
