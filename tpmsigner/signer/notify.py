"""Desktop notifications after each signature and refusal (``serve --notify``).

Each notification runs ``notify-send`` (Debian package libnotify-bin) in the
background: the reply to the agent never waits for it, a notify-send that
hangs is killed, and one that fails costs a log line.
"""

from __future__ import annotations

import asyncio
import html
import logging
import os
import shutil

from ..ratelimit import RateLimitedLogger
from .approvers import ApprovalRequest, _kill_group
from .children import bound_to_serve
from .requesttext import MAX_NAME_CHARS, MAX_PURPOSE_CHARS, destination_line, shorten

logger = logging.getLogger(__name__)

NOTIFY_PROGRAM = "notify-send"
APP_NAME = "tpmsigner"
# notify-send returns once the notification server has the message, which
# takes milliseconds; one still running after this is stuck and is killed.
NOTIFY_TIMEOUT = 10.0
# notify-send processes at once; further notifications are dropped and logged.
MAX_RUNNING = 8


class DesktopNotifier:
    """Shows a desktop notification for each signature and each refusal after a prompt."""

    def __init__(self, program: str, timeout: float = NOTIFY_TIMEOUT) -> None:
        self.program = program
        self.timeout = timeout
        self._running: set[asyncio.Task[None]] = set()
        self._log = RateLimitedLogger(logger)

    @classmethod
    def find(cls) -> DesktopNotifier | None:
        """Return a notifier using notify-send from PATH, or None (with a warning) if it is missing."""
        program = shutil.which(NOTIFY_PROGRAM)
        if program is None:
            logger.warning(
                "--notify: %s was not found on PATH, so desktop notifications are off; "
                "install the Debian package libnotify-bin",
                NOTIFY_PROGRAM,
            )
            return None
        logger.info("desktop notifications with %s", program)
        return cls(program)

    def signed(self, request: ApprovalRequest) -> None:
        """Start a notification that ``request`` was signed."""
        summary = f"Signed with {shorten(request.key_label, MAX_NAME_CHARS)}"
        self._start(summary, _body(request, ""))

    def refused(self, request: ApprovalRequest, reason: str) -> None:
        """Start a notification that ``request`` was not signed, and why."""
        summary = f"Not signed with {shorten(request.key_label, MAX_NAME_CHARS)}"
        self._start(summary, _body(request, reason))

    def _start(self, summary: str, body: str) -> None:
        if len(self._running) >= MAX_RUNNING:
            self._log.warning("%d notifications are still running; this one is dropped", len(self._running))
            return
        # "--" ends the options, so a summary starting with "-" stays text.
        argv = [self.program, f"--app-name={APP_NAME}", "--", summary, body]
        task = asyncio.get_running_loop().create_task(self._run(argv))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, argv: list[str]) -> None:
        try:
            process = await asyncio.create_subprocess_exec(
                *bound_to_serve(argv),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                env=dict(os.environ),
                start_new_session=True,
            )
        except OSError as exc:
            self._log.warning("cannot run %s: %s", self.program, exc)
            return

        try:
            await asyncio.wait_for(process.wait(), self.timeout)
        except asyncio.TimeoutError:
            self._log.warning("%s did not finish within %g s; killed it", self.program, self.timeout)
        finally:
            # Also on cancellation by close(): the process group goes, and
            # the process is reaped, so no zombie is left.
            _kill_group(process.pid)
            await process.wait()
        # A negative status is the SIGKILL above, already logged.
        if process.returncode is not None and process.returncode > 0:
            self._log.warning(
                "%s exited with status %d; is a notification server running in this session?",
                self.program,
                process.returncode,
            )

    @property
    def running(self) -> int:
        """The number of notify-send processes started and not yet reaped."""
        return len(self._running)

    async def wait(self) -> None:
        """Wait until every notification started so far has ended; each takes at most ``timeout`` seconds."""
        if self._running:
            await asyncio.wait(set(self._running))

    async def close(self) -> None:
        """Kill the notifications still running and wait until they are reaped."""
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def _body(request: ApprovalRequest, reason: str) -> str:
    """Return the notification body, with markup characters escaped.

    The Desktop Notifications Specification lets a server interpret a small
    HTML-like markup in the body ("body-markup"), so <, > and & from a peer
    are escaped; the summary is plain text in the specification.
    """
    lines = [reason] if reason else []
    if request.destination:
        lines.append(f"to {destination_line(request)}")
    purpose = shorten(request.purpose, MAX_PURPOSE_CHARS)
    lines.append(f"for {purpose}, from device {shorten(request.device, MAX_NAME_CHARS)}")
    lines.append(f"request #{request.request_id}")
    return html.escape("\n".join(lines), quote=False)
