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
    """Format a record, traceback included, as exactly one line.

    Line breaks are escaped, so a message that contains text from a peer
    cannot forge a second log line, and journald keeps a traceback in one
    entry instead of one entry per line.
    """

    def __init__(self, journal: bool) -> None:
        if journal:
            super().__init__("%(levelname)s %(name)s: %(message)s")
        else:
            super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\r", "\\r").replace("\n", "\\n")
        if self.journal:
            return f"<{syslog_priority(record.levelno)}>{text}"
        return text


def level_for(verbose: bool, quiet: bool) -> int:
    """Return the logging level for the -v and -q options: debug, warnings only, or info."""
    if verbose:
        return logging.DEBUG
    if quiet:
        return logging.WARNING
    return logging.INFO


def configure_logging(level: int) -> None:
    """Send every log record at ``level`` or above to stderr, one line each.

    Calling it again replaces the handler, for example after a daemon has
    pointed stderr at a log file.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(journal=stderr_is_journal()))
    logging.basicConfig(level=level, handlers=[handler], force=True)
