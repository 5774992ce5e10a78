"""Approvers: who gives the PIN for each signature, or refuses.

An approver is an object with ``async request_pin(request) -> str | None``.
It returns the PIN to approve, or None to refuse, and may raise TimeoutError
when nobody answered in time.  The server applies the approval timeout
around every call, so an approver that hangs is cancelled and the request
refused.  The pinentry and askpass approvers live in modules of their own.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import select
import shlex
import shutil
import signal
import termios
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol

from ..errors import ConfigError
from ..logsetup import terminal_logs_held
from ..printable import escape_nonprintable
from ..protocol.messages import ProcessInfo
from .children import bound_to_serve

logger = logging.getLogger(__name__)

MAX_PIN_OUTPUT = 4096
# After the approver exits, how long its stdout may take to reach EOF.
OUTPUT_GRACE_PERIOD = 0.5
# After SIGKILL, how long the approver may take to exit.
KILL_GRACE_PERIOD = 1.0
DEFAULT_APPROVAL_TIMEOUT = 60.0


@dataclass(frozen=True)
class ApprovalRequest:
    """The details of a sign request that an approver shows before a PIN is given."""

    request_id: int
    key_label: str
    key_fingerprint: str
    device: str
    process: ProcessInfo
    purpose: str          # "ssh-login", "sshsig:NAMESPACE" or "unknown"
    destination: str      # "user@host", "user@?" or ""
    destination_verified: bool = False  # the host key signed the session and is known_hosts' key for host
    host_key_fingerprint: str = ""      # of the server host key the session is bound to, if any
    forwarded: bool = False             # the request came through a forwarded agent
    certificate_key_id: str | None = None  # key id of the certificate the request names, if it names one
    certificate_status: str = ""        # "valid", "expired" or "not yet valid" when a certificate is named

    def environment(self) -> dict[str, str]:
        """Return the TPMSIGNER_* variables given to a ``command:`` approver."""
        return {
            "TPMSIGNER_KEY_LABEL": self.key_label,
            "TPMSIGNER_KEY_FINGERPRINT": self.key_fingerprint,
            "TPMSIGNER_DEVICE": self.device,
            "TPMSIGNER_PROCESS": _printable(self.process.describe()),
            "TPMSIGNER_PURPOSE": _printable(self.purpose),
            "TPMSIGNER_DESTINATION": _printable(self.destination),
            "TPMSIGNER_DESTINATION_VERIFIED": "yes" if self.destination_verified else "no",
            "TPMSIGNER_HOST_KEY_FINGERPRINT": self.host_key_fingerprint,
            "TPMSIGNER_FORWARDED": "yes" if self.forwarded else "no",
            "TPMSIGNER_CERTIFICATE": "no" if self.certificate_key_id is None else "yes",
            "TPMSIGNER_CERTIFICATE_KEY_ID": _printable(self.certificate_key_id or ""),
            "TPMSIGNER_CERTIFICATE_STATUS": self.certificate_status,
        }

    def summary(self) -> str:
        """Return a readable block describing the request, for a terminal.

        Fields are capped as in the desktop prompts, because a compromised
        agent host can send a field of hundreds of KiB that would scroll the
        rest of the summary off the terminal.
        """
        # Imported here because requesttext imports this module.
        from .requesttext import (
            MAX_DESTINATION_CHARS,
            MAX_NAME_CHARS,
            MAX_PROCESS_CHARS,
            MAX_PURPOSE_CHARS,
            shorten,
        )

        lines = [
            f"Signature request #{self.request_id}",
            f"  device:      {shorten(self.device, MAX_NAME_CHARS)}",
            f"  process:     {shorten(self.process.describe(), MAX_PROCESS_CHARS, keep_end=True)}",
            f"  key:         {shorten(self.key_label, MAX_NAME_CHARS)} ({self.key_fingerprint})",
        ]
        if self.certificate_key_id is not None:
            lines.append(f'  certificate: key id "{_printable(self.certificate_key_id)}" ({self.certificate_status})')
        lines.append(f"  purpose:     {shorten(self.purpose, MAX_PURPOSE_CHARS)}")
        if self.destination:
            state = "verified" if self.destination_verified else "NOT verified"
            lines.append(f"  destination: {shorten(self.destination, MAX_DESTINATION_CHARS)} ({state})")
        if self.host_key_fingerprint:
            lines.append(f"  host key:    {self.host_key_fingerprint}")
        if self.forwarded:
            lines.append("  forwarded:   yes, through a forwarded agent on another host")
        return "\n".join(lines)


def _printable(text: str) -> str:
    """Escape control characters, so a peer cannot repaint the prompt."""
    return escape_nonprintable(text)


class Approver(Protocol):
    async def request_pin(self, request: ApprovalRequest) -> str | None: ...


def check_approver(approver: Approver) -> None:
    """Raise ConfigError if ``approver`` cannot possibly work, before serving starts."""
    check = getattr(approver, "check", None)
    if check is not None:
        check()


class CallableApprover:
    """Wraps a library caller's function (plain or async) as an approver."""

    def __init__(self, function: Callable[[ApprovalRequest], str | None | Awaitable[str | None]]) -> None:
        self._function = function

    async def request_pin(self, request: ApprovalRequest) -> str | None:
        if inspect.iscoroutinefunction(self._function):
            return await self._function(request)
        # A plain function may block (a dialog, a prompt), so it runs on a
        # thread of its own rather than on the event loop.
        return await asyncio.to_thread(self._function, request)


class CommandApprover:
    """Runs a program, without a shell, for each request.

    The details are in TPMSIGNER_* environment variables.  The program
    approves by exiting 0 with the PIN as its first line on stdout; any other
    exit status refuses.
    """

    def __init__(self, argv: list[str], timeout: float = DEFAULT_APPROVAL_TIMEOUT) -> None:
        if not argv:
            raise ConfigError("the command: approver needs a program, as command:PROGRAM")
        self.argv = argv
        self.timeout = timeout

    def check(self) -> None:
        program = self.argv[0]
        resolved = shutil.which(program)
        if resolved is None:
            raise ConfigError(
                f"approver program {program!r} was not found or is not executable; "
                "give a path to an executable file, as command:/path/to/program"
            )

    async def request_pin(self, request: ApprovalRequest) -> str | None:
        environment = dict(os.environ)
        environment.update(request.environment())
        return await run_approver_program(self.argv, environment, self.timeout, request.request_id)


async def run_approver_program(
    argv: list[str], environment: dict[str, str], timeout: float, request_id: int
) -> str | None:
    """Run an approver program and return the first line of its output, or None if it refused.

    The program approves by exiting 0; any other status refuses.  Raises
    TimeoutError after ``timeout`` seconds.  The program and everything it
    started in its process group are killed whenever it ends.
    """
    loop = asyncio.get_running_loop()
    try:
        # A session of its own, so that on timeout the whole process
        # group goes, including helpers the approver started.
        transport, protocol = await loop.subprocess_exec(
            _ApproverProtocol,
            *bound_to_serve(argv, environment.get("PATH")),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,
            env=environment,
            start_new_session=True,
        )
    except (OSError, ValueError) as exc:
        # ValueError: an argument or variable with a NUL character.
        logger.error("request %d: cannot run approver %r: %s", request_id, argv[0], exc)
        return None

    pid = transport.get_pid()
    try:
        # The decision is the exit status.  asyncio's Process.wait() also
        # waits until stdout is closed (CPython 3.11, base_subprocess.py),
        # which a helper the approver left running may never do, so the
        # exit is awaited on its own.
        await asyncio.wait_for(asyncio.shield(protocol.exited), timeout)
        await asyncio.wait({protocol.output_closed}, timeout=OUTPUT_GRACE_PERIOD)
    finally:
        _kill_group(pid)
        if not protocol.exited.done():
            # asyncio's child watcher reaps the killed program.  Closing
            # the transport before that calls Popen.poll(), which could reap
            # it first, and the watcher then logs an unknown child process.
            await asyncio.wait({protocol.exited}, timeout=KILL_GRACE_PERIOD)
        # Closing the transport closes the read end of stdout, which a
        # helper outside the process group may still hold open.
        transport.close()

    returncode = transport.get_returncode()
    if returncode != 0:
        logger.info("request %d: approver exited with status %d: denied", request_id, returncode)
        return None
    first_line = bytes(protocol.output).split(b"\n", 1)[0].rstrip(b"\r")
    try:
        return first_line.decode("utf-8")
    except UnicodeDecodeError:
        logger.error("request %d: approver printed a PIN that is not UTF-8: denied", request_id)
        return None


class _ApproverProtocol(asyncio.SubprocessProtocol):
    """Collects up to MAX_PIN_OUTPUT bytes of an approver's stdout, and notes its exit."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.output = bytearray()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.output_closed: asyncio.Future[None] = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if len(self.output) < MAX_PIN_OUTPUT:
            self.output += data[: MAX_PIN_OUTPUT - len(self.output)]

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if not self.output_closed.done():
            self.output_closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class TtyApprover:
    """Asks on the terminal that runs ``serve``, one request at a time."""

    def __init__(self, tty_path: str = "/dev/tty", timeout: float = DEFAULT_APPROVAL_TIMEOUT) -> None:
        self.tty_path = tty_path
        self.timeout = timeout
        self._turn = asyncio.Lock()

    def check(self) -> None:
        try:
            fd = os.open(self.tty_path, os.O_RDWR | os.O_NOCTTY)
        except OSError as exc:
            raise ConfigError(
                f"the tty approver needs a terminal, but {self.tty_path} cannot be opened "
                f"({exc.strerror}); run serve in a terminal, or use --approver command:PROGRAM"
            ) from None
        os.close(fd)

    async def request_pin(self, request: ApprovalRequest) -> str | None:
        async with self._turn:
            # The server's own timeout normally ends the wait first; this
            # deadline only stops the reading thread if it outlives the server.
            deadline = time.monotonic() + self.timeout + 1.0
            cancelled = threading.Event()
            try:
                return await asyncio.to_thread(self._prompt, request, deadline, cancelled)
            finally:
                cancelled.set()

    def _prompt(self, request: ApprovalRequest, deadline: float, cancelled: threading.Event) -> str | None:
        try:
            fd = os.open(self.tty_path, os.O_RDWR | os.O_NOCTTY)
        except OSError as exc:
            # serve checks for a terminal at start, so under serve the terminal
            # went away later, for example closed while serve ran under nohup.
            logger.error(
                "request #%d: the tty approver has no terminal to ask on: %s cannot be opened (%s); denied. "
                "Run serve in a terminal, or use --approver command:PROGRAM",
                request.request_id,
                self.tty_path,
                exc.strerror,
            )
            return None

        try:
            # serve's log lines go to the same terminal, and one written
            # mid-prompt would break the prompt or push the request's
            # summary out of sight.  They follow once the prompt is answered.
            with terminal_logs_held():
                pin = _ask_on_terminal(fd, request, deadline, cancelled)
        except (OSError, termios.error) as exc:
            logger.error(
                "request #%d: the terminal %s failed while asking for the PIN (%s); denied. Was the terminal closed?",
                request.request_id,
                self.tty_path,
                exc,
            )
            return None
        finally:
            os.close(fd)
        return pin or None


def _ask_on_terminal(fd: int, request: ApprovalRequest, deadline: float, cancelled: threading.Event) -> str | None:
    """Show the request on the terminal ``fd`` and read the PIN with echo off."""
    old_attributes = termios.tcgetattr(fd)
    no_echo = termios.tcgetattr(fd)
    no_echo[3] &= ~termios.ECHO
    # Echo goes off, and anything typed before the prompt is
    # discarded (TCSAFLUSH), before the prompt is shown: a line typed
    # ahead was not typed in answer to this request.
    termios.tcsetattr(fd, termios.TCSAFLUSH, no_echo)
    try:
        os.write(fd, (
            "\n" + request.summary() + "\n"
            f"PIN for {request.key_label} (empty line refuses): "
        ).encode("utf-8"))
        pin = _read_line(fd, deadline, cancelled)
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, old_attributes)
    if cancelled.is_set():
        os.write(fd, f"\nrequest #{request.request_id} expired or was withdrawn; nothing was signed\n".encode())
    else:
        os.write(fd, b"\n")
    return pin


def _read_line(fd: int, deadline: float, cancelled: threading.Event) -> str | None:
    """Read one line from a terminal until ``deadline``; None on timeout or cancel."""
    buffer = b""
    while b"\n" not in buffer and not cancelled.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        readable, _, _ = select.select([fd], [], [], min(remaining, 0.2))
        if not readable:
            continue
        chunk = os.read(fd, 256)
        if not chunk:
            return None
        buffer += chunk
        if len(buffer) > MAX_PIN_OUTPUT:
            return None
    if cancelled.is_set():
        return None
    return buffer.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", errors="replace")


def approver_from_spec(spec: str, timeout: float = DEFAULT_APPROVAL_TIMEOUT) -> Approver:
    """Build an approver from its command-line form.

    The forms are ``tty``, ``command:PROGRAM``, ``pinentry[:PROGRAM]`` and
    ``askpass[:PROGRAM]``.  PROGRAM is split like a shell command line, except
    for askpass, whose program takes no arguments of its own.
    """
    # Imported here because these modules import this one.
    from .askpass import AskpassApprover
    from .pinentry import PinentryApprover

    if spec == "tty":
        return TtyApprover(timeout=timeout)
    if spec.startswith("command:"):
        return CommandApprover(_split_program(spec, "command:"), timeout=timeout)
    if spec == "pinentry":
        return PinentryApprover(timeout=timeout)
    if spec.startswith("pinentry:"):
        argv = _split_program(spec, "pinentry:")
        if not argv:
            raise ConfigError("the pinentry: approver needs a program, as pinentry:PROGRAM, or use plain 'pinentry'")
        return PinentryApprover(argv, timeout=timeout)
    if spec == "askpass":
        return AskpassApprover(timeout=timeout)
    if spec.startswith("askpass:"):
        program = spec[len("askpass:") :]
        if not program:
            raise ConfigError("the askpass: approver needs a program, as askpass:PROGRAM, or use plain 'askpass'")
        return AskpassApprover(program, timeout=timeout)
    raise ConfigError(
        f"unknown approver {spec!r}: use 'tty', 'command:PROGRAM', 'pinentry[:PROGRAM]' or 'askpass[:PROGRAM]'"
    )


def _split_program(spec: str, prefix: str) -> list[str]:
    try:
        return shlex.split(spec[len(prefix) :])
    except ValueError as exc:
        raise ConfigError(f"invalid approver command {spec!r}: {exc}") from None
