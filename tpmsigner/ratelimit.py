"""Rate-limited logging for messages that untrusted peers can trigger at will."""

from __future__ import annotations

import logging
import time


class RateLimitedLogger:
    """Log at most ``limit`` messages per ``window`` seconds, then count the rest.

    When a new window starts, one line reports how many messages were
    suppressed in the previous one, so a flood stays visible in the log
    without filling it.
    """

    def __init__(self, logger: logging.Logger, limit: int = 10, window: float = 60.0) -> None:
        self.logger = logger
        self.limit = limit
        self.window = window
        self._window_start = time.monotonic()
        self._count = 0
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        self.log(logging.WARNING, message, *args)

    def error(self, message: str, *args: object) -> None:
        self.log(logging.ERROR, message, *args)

    def log(self, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window_start >= self.window:
            if self._suppressed:
                self.logger.log(level, "%d similar messages suppressed in the last %g s", self._suppressed, self.window)
            self._window_start = now
            self._count = 0
            self._suppressed = 0
        if self._count < self.limit:
            self._count += 1
            self.logger.log(level, message, *args)
        else:
            self._suppressed += 1
