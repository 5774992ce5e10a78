"""The ``pinentry`` approver: GnuPG's pinentry dialogs ask for the PIN.

A new pinentry process is started for each request and driven over its
stdin and stdout with the Assuan protocol (assuan.py): the request details
go in SETDESC, the person types the PIN or cancels, and the process ends.
No PIN cache is ever allowed: the option allow-external-password-cache is
never set and SETKEYINFO, which names the key to a cache, is never sent.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import shutil
import signal
import stat
import termios
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from ..errors import ConfigError, PinentryError
from ..logsetup import terminal_logs_held
from .approvers import DEFAULT_APPROVAL_TIMEOUT, MAX_PIN_OUTPUT, ApprovalRequest, _kill_group
from .assuan import (
    GPG_ERR_CANCELED,
    GPG_ERR_NOT_CONFIRMED,
    GPG_ERR_TIMEOUT,
    MAX_LINE_BYTES,
    AssuanClient,
    Reply,
)
from .children import bound_to_serve
from .requesttext import describe_request

logger = logging.getLogger(__name__)

DEFAULT_PROGRAM = "pinentry"
# How long a pinentry may take to start, and to respond to each request
# before GETPIN.  No person is involved yet, so a longer wait means it hangs.
SETUP_TIMEOUT = 10.0
# After GETPIN, how long the pinentry may take to end once asked with BYE.
EXIT_GRACE_PERIOD = 1.0
# How long the killed process group may take to be reaped.
REAP_TIMEOUT = 5.0
INSTALL_HINT = (
    "install one, e.g. 'apt install pinentry-gnome3' for a desktop or 'apt install pinentry-tty' for a "
    "terminal, or give its path as pinentry:/usr/bin/pinentry-qt"
)
# Values passed in OPTION lines unescaped (pinentry does not decode OPTION
# values), so only characters that need no escaping are allowed.
_SAFE_OPTION_VALUE = re.compile(r"[A-Za-z0-9/._@+:-]+")
# /proc/PID/stat field 7 (tty_nr) numbers the controlling terminal; see proc(5).
_STAT_TTY_FIELD = 4


def controlling_terminal() -> str | None:
    """Return the device path of this process's controlling terminal, or None without one.

    ``os.ttyname`` on /dev/tty returns "/dev/tty", which means nothing to a
    pinentry in a session of its own, so the device is found by its number.
    """
    try:
        fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        number = int(fields[_STAT_TTY_FIELD])
    except (OSError, IndexError, ValueError):
        return None
    if number == 0:
        return None

    wanted = (os.major(number), os.minor(number))
    for directory in (Path("/dev/pts"), Path("/dev")):
        try:
            entries = sorted(directory.iterdir())
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat()
            except OSError:
                continue
            if stat.S_ISCHR(info.st_mode) and (os.major(info.st_rdev), os.minor(info.st_rdev)) == wanted:
                return str(entry)
    return None


def _locale_ctype() -> str | None:
    """Return the character-type locale as the C library resolves it: LC_ALL, LC_CTYPE, then LANG."""
    for name in ("LC_ALL", "LC_CTYPE", "LANG"):
        value = os.environ.get(name)
        if value:
            return value
    return None


def _safe_option_value(value: str | None) -> str | None:
    return value if value and _SAFE_OPTION_VALUE.fullmatch(value) else None


@dataclass
class _SavedTerminal:
    """A terminal's settings from before a pinentry ran on it, to restore if it has to be killed.

    pinentry-tty and pinentry-curses turn echo off while they read; killed,
    they leave the terminal that way.
    """

    path: str
    attributes: list = field(repr=False)

    @classmethod
    def save(cls, path: str) -> _SavedTerminal | None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            return cls(path, termios.tcgetattr(fd))
        except termios.error:
            return None
        finally:
            os.close(fd)

    def restore(self, note: str) -> None:
        """Put the settings back and write ``note`` on the terminal."""
        # A process outside the terminal's foreground process group gets
        # SIGTTOU for tcsetattr, which would stop serve.  With the signal
        # blocked, the call succeeds (POSIX, "Terminal Access Control").
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            try:
                termios.tcsetattr(fd, termios.TCSANOW, self.attributes)
                os.write(fd, note.encode("utf-8"))
            finally:
                os.close(fd)
        except (OSError, termios.error) as exc:
            logger.warning("cannot restore the settings of terminal %s: %s", self.path, exc)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


class PinentryApprover:
    """Asks for the PIN with a pinentry program, one request at a time.

    On a terminal the pinentry receives the terminal's name, type and
    character set, which pinentry-tty and pinentry-curses need; graphical
    pinentries find the display in DISPLAY or WAYLAND_DISPLAY.  The
    terminal is ``terminal``, else this process's controlling terminal if
    ``find_terminal`` is true.
    """

    def __init__(
        self,
        argv: list[str] | None = None,
        timeout: float = DEFAULT_APPROVAL_TIMEOUT,
        *,
        terminal: str | None = None,
        find_terminal: bool = True,
        setup_timeout: float = SETUP_TIMEOUT,
    ) -> None:
        self.argv = argv or [DEFAULT_PROGRAM]
        self.timeout = timeout
        self.terminal = terminal if terminal is not None or not find_terminal else controlling_terminal()
        self.setup_timeout = setup_timeout
        self._turn = asyncio.Lock()

    def check(self) -> None:
        program = self.argv[0]
        resolved = shutil.which(program)
        if resolved is None:
            raise ConfigError(f"pinentry program {program!r} was not found or is not executable; {INSTALL_HINT}")
        display = os.environ.get("WAYLAND_DISPLAY") or os.environ.get("DISPLAY")
        if self.terminal is None and not display:
            raise ConfigError(
                "the pinentry approver needs a terminal or a graphical session, but serve has no controlling "
                "terminal and neither DISPLAY nor WAYLAND_DISPLAY is set; run serve in a terminal or in the "
                "desktop session"
            )
        logger.info(
            "pinentry approver: %s, on %s",
            resolved,
            f"terminal {self.terminal}" if self.terminal else f"display {display}",
        )

    async def request_pin(self, request: ApprovalRequest) -> str | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        async with self._turn:
            if self.terminal is None:
                return await _PinentryDialog(self, request, deadline).run()
            # A terminal pinentry shares serve's terminal with its log lines,
            # which wait until the dialog is over (tpmsigner.logsetup).
            with terminal_logs_held():
                return await _PinentryDialog(self, request, deadline).run()


async def _reap(process: asyncio.subprocess.Process) -> None:
    """Discard the rest of a killed pinentry's output, then wait for its exit status.

    Until its stdout reaches end of file, asyncio does not report the exit.
    """
    assert process.stdout is not None
    while await process.stdout.read(4096):
        pass
    await process.wait()


class _PinentryDialog:
    """One pinentry process asking for one request's PIN."""

    def __init__(self, approver: PinentryApprover, request: ApprovalRequest, deadline: float) -> None:
        self.approver = approver
        self.request = request
        self.deadline = deadline
        self.loop = asyncio.get_running_loop()
        self.getpin_sent = False

    async def run(self) -> str | None:
        request_id = self.request.request_id
        program = self.approver.argv[0]
        terminal = self.approver.terminal
        saved_terminal = _SavedTerminal.save(terminal) if terminal else None
        try:
            process = await asyncio.create_subprocess_exec(
                *bound_to_serve(self.approver.argv),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                # With --debug, pinentry writes the PIN to stderr, and its
                # ERR replies already say what failed.
                stderr=asyncio.subprocess.DEVNULL,
                # A session of its own: the process group can be killed as a
                # whole, and a terminal pinentry reads the terminal named in
                # OPTION ttyname without job control stopping it.
                start_new_session=True,
                limit=MAX_LINE_BYTES,
            )
        except OSError as exc:
            logger.error("request #%d: cannot run pinentry %r: %s; denied", request_id, program, exc)
            return None

        assert process.stdin is not None and process.stdout is not None
        client = AssuanClient(process.stdout, process.stdin, max_data_bytes=MAX_PIN_OUTPUT)
        try:
            return await self._converse(client, process)
        except PinentryError as exc:
            logger.error("request #%d: pinentry %r: %s; denied", request_id, program, exc)
            return None
        finally:
            killed = process.returncode is None
            _kill_group(process.pid)
            process.stdin.close()
            try:
                await asyncio.wait_for(_reap(process), REAP_TIMEOUT)
            except asyncio.TimeoutError:
                logger.error("request #%d: pinentry pid %d did not end after SIGKILL", request_id, process.pid)
            if killed and self.getpin_sent and saved_terminal is not None:
                saved_terminal.restore(f"\nrequest #{request_id} expired or was withdrawn; nothing was signed\n")

    async def _converse(self, client: AssuanClient, process: asyncio.subprocess.Process) -> str | None:
        request_id = self.request.request_id
        try:
            await client.connect(timeout=self._setup_timeout())
        except TimeoutError:
            self._raise_setup_timeout("its greeting")

        for command, argument, required in self._setup_requests():
            reply = await self._setup_request(client, command, argument)
            if not reply.ok:
                if required:
                    raise PinentryError(f"{command} failed: ERR {reply.error_code} {reply.error_text}")
                logger.debug("request #%d: pinentry ignored %s: ERR %d", request_id, command, reply.error_code)

        self.getpin_sent = True
        # The signer's approval timeout normally cancels this wait first.
        # This limit matters only to a caller without one.
        remaining = self.deadline - self.loop.time()
        reply = await client.request("GETPIN", timeout=remaining + EXIT_GRACE_PERIOD)
        pin = self._pin_from(reply)

        # The dialog has ended; BYE lets the pinentry exit by itself.
        try:
            await client.request("BYE", timeout=EXIT_GRACE_PERIOD)
            await asyncio.wait_for(process.wait(), EXIT_GRACE_PERIOD)
        except (TimeoutError, PinentryError):
            pass
        return pin

    def _setup_requests(self) -> list[tuple[str, str, bool]]:
        """Return (command, argument, required) for each request before GETPIN."""
        requests: list[tuple[str, str, bool]] = []
        terminal = self.approver.terminal
        if terminal is not None and _safe_option_value(terminal):
            requests.append(("OPTION", f"ttyname={terminal}", False))
            ttytype = _safe_option_value(os.environ.get("TERM"))
            if ttytype:
                requests.append(("OPTION", f"ttytype={ttytype}", False))
        lc_ctype = _safe_option_value(_locale_ctype())
        if lc_ctype:
            requests.append(("OPTION", f"lc-ctype={lc_ctype}", False))

        # SETTIMEOUT takes whole seconds; rounding up keeps the pinentry open
        # until the signer itself gives up on the request.
        seconds = max(1, math.ceil(self.deadline - self.loop.time()))
        requests += [
            ("SETTITLE", f"tpmsigner: signature request #{self.request.request_id}", False),
            ("SETDESC", describe_request(self.request), True),
            ("SETPROMPT", "PIN:", True),
            ("SETOK", "_Sign", False),
            ("SETCANCEL", "_Refuse", False),
            ("SETTIMEOUT", str(seconds), False),
        ]
        return requests

    async def _setup_request(self, client: AssuanClient, command: str, argument: str) -> Reply:
        try:
            return await client.request(command, argument, timeout=self._setup_timeout(), truncate=True)
        except TimeoutError:
            self._raise_setup_timeout(command)

    def _setup_timeout(self) -> float:
        return min(self.approver.setup_timeout, self.deadline - self.loop.time())

    def _raise_setup_timeout(self, what: str) -> NoReturn:
        if self.deadline - self.loop.time() <= 0:
            # The request's own time ran out: a timeout, as for any approver.
            raise TimeoutError
        raise PinentryError(f"the pinentry did not respond to {what} within {self.approver.setup_timeout:g} s")

    def _pin_from(self, reply: Reply) -> str | None:
        request_id = self.request.request_id
        if reply.error == GPG_ERR_TIMEOUT:
            logger.info("request #%d: the pinentry timed out", request_id)
            raise TimeoutError
        if reply.error in (GPG_ERR_CANCELED, GPG_ERR_NOT_CONFIRMED):
            logger.info("request #%d: cancelled in the pinentry", request_id)
            return None
        if not reply.ok:
            logger.warning(
                "request #%d: pinentry GETPIN failed: ERR %d %s; denied", request_id, reply.error_code, reply.error_text
            )
            return None
        if "PASSWORD_FROM_CACHE" in reply.status:
            # No person typed this PIN.  tpmsigner never allows a cache, so
            # a PIN that a pinentry took from one anyway is rejected.
            logger.warning("request #%d: the pinentry returned a PIN from a password cache; denied", request_id)
            return None
        if not reply.data:
            logger.info("request #%d: empty PIN in the pinentry", request_id)
            return None
        try:
            return reply.data.decode("utf-8")
        except UnicodeDecodeError:
            logger.error("request #%d: the pinentry returned a PIN that is not UTF-8; denied", request_id)
            return None
