"""Log lines on stderr for the two programs: one line per event, with level and logger name.

On a terminal or in a file each line starts with a timestamp.  When stderr
is the systemd journal, journald stamps each line itself, so the line starts
instead with a ``<N>`` syslog priority prefix, which journald stores as the
entry's priority (sd-daemon(3), SyslogLevelPrefix= in systemd.exec(5)).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import deque
from contextlib import contextmanager
from typing import Iterator

from .printable import escape_nonprintable

# syslog(3) priorities for sd-daemon(3)'s "<N>" line prefixes.
_SYSLOG_PRIORITIES = (
    (logging.CRITICAL, 2),  # LOG_CRIT
    (logging.ERROR, 3),  # LOG_ERR
    (logging.WARNING, 4),  # LOG_WARNING
    (logging.INFO, 6),  # LOG_INFO
)
_LOG_DEBUG = 7


def syslog_priority(level: int) -> int:
    """Return the syslog priority of a logging level."""
    for threshold, priority in _SYSLOG_PRIORITIES:
        if level >= threshold:
            return priority
    return _LOG_DEBUG


def stderr_is_journal() -> bool:
    """Tell whether stderr is the journal's stream.

    systemd sets JOURNAL_STREAM to the DEVICE:INODE of the stream it
    connects to stderr (systemd.exec(5)).  Comparing it with stderr's own
    device and inode distinguishes the journal from a redirected stderr, or
    from the stderr of a child that was given another one.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    device, separator, inode = value.partition(":")
    if not separator or not device.isdigit() or not inode.isdigit():
        return False
    try:
        info = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return info.st_dev == int(device) and info.st_ino == int(inode)


class OneLineFormatter(logging.Formatter):
    """Format a record, traceback included, as exactly one line of printable text.

    Line breaks are escaped, so a message that contains text from a peer
    cannot forge a second log line, and journald keeps a traceback in one
    entry instead of one entry per line.  Every other control character is
    escaped too, because serve's log shares the terminal of the tty
    approver's prompt, and an escape sequence in a log line could repaint it.
    """

    def __init__(self, journal: bool) -> None:
        if journal:
            super().__init__("%(levelname)s %(name)s: %(message)s")
        else:
            super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = escape_nonprintable(super().format(record).replace("\r", "\\r").replace("\n", "\\n"))
        if self.journal:
            return f"<{syslog_priority(record.levelno)}>{text}"
        return text


class LibraryTracebackFilter(logging.Filter):
    """Drop the traceback from other libraries' warnings unless debug messages are on.

    zeroconf logs a warning with a whole traceback when one interface
    cannot send multicast, for example an IPv6 loopback without the
    MULTICAST flag, which is Debian's default.  The error itself is in the
    message, and the traceback helps only someone debugging.
    """

    LIBRARIES = frozenset({"zeroconf"})

    def filter(self, record: logging.LogRecord) -> bool:
        library = record.name.split(".", 1)[0]
        if record.exc_info and record.levelno < logging.ERROR and library in self.LIBRARIES:
            if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
                record.exc_info = None
                record.exc_text = None
        return True


def level_for(verbose: bool, quiet: bool) -> int:
    """Return the logging level for the -v and -q options: debug, warnings only, or info."""
    if verbose:
        return logging.DEBUG
    if quiet:
        return logging.WARNING
    return logging.INFO


# The maximum number of log records kept back while a prompt is on the
# terminal.  Beyond it, the oldest are dropped and counted.
MAX_HELD_RECORDS = 1000


class _Hold:
    """The records that terminal handlers keep back while a prompt is shown (see ``terminal_logs_held``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.records: deque[tuple[logging.Handler, logging.LogRecord]] = deque(maxlen=MAX_HELD_RECORDS)
        self.dropped = 0

    def keep(self, handler: logging.Handler, record: logging.LogRecord) -> bool:
        """Keep ``record`` for later and return True, if a hold is on."""
        with self.lock:
            if not self.depth:
                return False
            if len(self.records) == self.records.maxlen:
                self.dropped += 1
            self.records.append((handler, record))
            return True


_hold = _Hold()


class TerminalHoldingHandler(logging.StreamHandler):
    """A stderr handler that keeps records back while a prompt is on the same terminal.

    A log line written in the middle of a PIN prompt breaks the prompt's
    line, and a stream of them could scroll the request's summary out of
    sight.  Only a stream that is a terminal is held: a file or the journal
    gets every line at once.
    """

    def emit(self, record: logging.LogRecord) -> None:
        if self._is_terminal() and _hold.keep(self, record):
            return
        super().emit(record)

    def _is_terminal(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError, OSError):
            return False


@contextmanager
def terminal_logs_held() -> Iterator[None]:
    """Keep log lines off the terminal for the duration of the block, then write them.

    The records keep their own timestamps.  Holds may nest and overlap
    across threads, and the records go out when the last one ends.
    """
    with _hold.lock:
        _hold.depth += 1
    try:
        yield
    finally:
        with _hold.lock:
            _hold.depth -= 1
            released = list(_hold.records) if not _hold.depth else []
            dropped = _hold.dropped if not _hold.depth else 0
            if not _hold.depth:
                _hold.records.clear()
                _hold.dropped = 0
        if dropped:
            logging.getLogger(__name__).warning(
                "%d log lines were dropped while a prompt was on the terminal; the last %d follow",
                dropped,
                len(released),
            )
        for handler, record in released:
            handler.handle(record)


def configure_logging(level: int) -> None:
    """Send every log record at ``level`` or above to stderr, one line each.

    Calling it again replaces the handler, for example after a daemon has
    pointed stderr at a log file.
    """
    handler = TerminalHoldingHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(journal=stderr_is_journal()))
    handler.addFilter(LibraryTracebackFilter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
