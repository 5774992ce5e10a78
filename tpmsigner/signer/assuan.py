"""A client for the Assuan protocol, as much of it as a pinentry program speaks.

Sources: "Developing with Assuan" (the libassuan manual), section 3.1
"Server responses" and section 3.2 "Client requests"; pinentry's manual,
chapter "pinentry's Assuan Protocol".  The client sends one request line and
reads status (``S``), comment (``#``), data (``D``) and inquiry
(``INQUIRE``) lines until the ``OK`` or ``ERR`` that ends the reply.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ..errors import PinentryError

# A line, with its command and its line end, has at most 1000 bytes
# (section 3.2).  A client treats a longer line as a communication error
# (section 3.1).
MAX_LINE_BYTES = 1000

# An ERR code is a libgpg-error value: the error source in bits 24-30 (5 is
# pinentry) and the error code in the low 16 bits, so pinentry's "Operation
# cancelled" is (5 << 24) | 99 = 83886179.  Codes from gpg-error.h.
GPG_ERR_CODE_MASK = 0xFFFF
GPG_ERR_TIMEOUT = 62
GPG_ERR_CANCELED = 99
GPG_ERR_NOT_CONFIRMED = 114

# Status keywords kept per reply; a pinentry sends one or two.
MAX_STATUS_KEYWORDS = 16
# Characters of an ERR description kept for the log.
MAX_ERROR_TEXT_CHARS = 200

_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_ELLIPSIS = "\u2026"


def escape(text: str) -> bytes:
    """Percent-escape ``text`` as an Assuan request argument, in UTF-8.

    Section 3.2 requires "%", CR and LF to be escaped, and a backslash at the
    end of a line.  Every control byte and every backslash is escaped here, so
    an argument can never end the line, continue it, or reach a terminal as a
    control sequence.
    """
    escaped = bytearray()
    for byte in text.encode("utf-8", errors="replace"):
        if byte < 0x20 or byte in (0x25, 0x5C, 0x7F):
            escaped += b"%%%02X" % byte
        else:
            escaped.append(byte)
    return bytes(escaped)


def unescape(data: bytes) -> bytes:
    """Decode the %XX escapes of a ``D`` line (section 3.1); raise PinentryError on a malformed one."""
    pieces = data.split(b"%")
    decoded = bytearray(pieces[0])
    for piece in pieces[1:]:
        digits = piece[:2]
        if len(digits) != 2 or not all(byte in _HEX_DIGITS for byte in digits):
            # The message leaves the data out: it may be part of a PIN.
            raise PinentryError("the pinentry sent a data line with a malformed %XX escape")
        decoded.append(int(digits, 16))
        decoded += piece[2:]
    return bytes(decoded)


def request_line(command: str, argument: str = "", *, truncate: bool = False) -> bytes:
    """Build one request line, ``COMMAND escaped-argument`` and LF.

    If the line would exceed MAX_LINE_BYTES, the argument is cut and ends
    with an ellipsis when ``truncate`` is true; otherwise ValueError is raised.
    """
    if not command or not command.replace("_", "").isalpha() or not command.isascii():
        raise ValueError(f"invalid Assuan command {command!r}: expected one word of ASCII letters")
    if not argument:
        return command.encode("ascii") + b"\n"

    budget = MAX_LINE_BYTES - len(command) - len(" \n")
    escaped = escape(argument)
    if len(escaped) > budget:
        if not truncate:
            raise ValueError(f"{command} argument is {len(escaped)} bytes escaped, over the {budget}-byte line budget")
        escaped = _truncated(argument, budget)
    return command.encode("ascii") + b" " + escaped + b"\n"


def _truncated(argument: str, budget: int) -> bytes:
    """Escape the longest prefix of ``argument`` that fits in ``budget`` bytes with an ellipsis after it."""
    ellipsis = escape(_ELLIPSIS)
    kept = bytearray()
    for character in argument:
        escaped = escape(character)
        if len(kept) + len(escaped) + len(ellipsis) > budget:
            break
        kept += escaped
    return bytes(kept) + ellipsis


@dataclass(frozen=True)
class Reply:
    """The outcome of one request: its data, or the ERR that ended it."""

    data: bytes = b""
    error_code: int | None = None      # the whole ERR value; None for OK
    error_text: str = ""               # the ERR description, printable and shortened
    status: tuple[str, ...] = ()       # keywords of the S lines, in order

    @property
    def ok(self) -> bool:
        return self.error_code is None

    @property
    def error(self) -> int | None:
        """The libgpg-error code (the low 16 bits of the ERR value), or None for OK."""
        return None if self.error_code is None else self.error_code & GPG_ERR_CODE_MASK


class AssuanClient:
    """Talks to an Assuan server, such as a pinentry, over its stdin and stdout.

    ``reader`` should have a limit of about MAX_LINE_BYTES, so that a server
    sending a line without an end cannot fill memory.  Data lines of one
    reply may add up to ``max_data_bytes``; more is an error.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_data_bytes: int) -> None:
        self._reader = reader
        self._writer = writer
        self._max_data_bytes = max_data_bytes

    async def connect(self, *, timeout: float) -> None:
        """Read the server's greeting, which is an OK line; raise TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            reply = await self._read_reply()
        if not reply.ok:
            raise PinentryError(f"the pinentry refused the connection: ERR {reply.error_code} {reply.error_text}")

    async def request(self, command: str, argument: str = "", *, timeout: float, truncate: bool = False) -> Reply:
        """Send a request and read its reply; raise TimeoutError if it takes over ``timeout`` seconds."""
        line = request_line(command, argument, truncate=truncate)
        async with asyncio.timeout(timeout):
            await self._send(line)
            return await self._read_reply()

    async def _send(self, line: bytes) -> None:
        try:
            self._writer.write(line)
            await self._writer.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise PinentryError("the pinentry closed its input") from None

    async def _read_reply(self) -> Reply:
        data = bytearray()
        status: list[str] = []
        while True:
            line = await self._read_line()
            if line == b"OK" or line.startswith(b"OK "):
                return Reply(bytes(data), status=tuple(status))
            if line.startswith(b"ERR "):
                # Data lines before an ERR are dropped: a partial PIN is no PIN.
                code, text = _parse_error(line)
                return Reply(error_code=code, error_text=text, status=tuple(status))
            if line.startswith(b"D "):
                chunk = unescape(line[2:])
                if len(data) + len(chunk) > self._max_data_bytes:
                    raise PinentryError(f"the pinentry sent more than {self._max_data_bytes} bytes of data")
                data += chunk
            elif line.startswith(b"S "):
                if len(status) < MAX_STATUS_KEYWORDS:
                    keyword = line[2:].split(b" ", 1)[0]
                    status.append(keyword.decode("ascii", errors="replace"))
            elif line.startswith(b"INQUIRE "):
                # Nothing this client sends needs more data.  Section 3.1
                # lets a client cancel an inquiry with CAN, and the server
                # then ends the request with ERR.
                await self._send(b"CAN\n")
            elif line.startswith(b"#") or not line:
                continue
            else:
                # The line itself is not shown: a broken pinentry could have
                # put the PIN in it.
                raise PinentryError(f"the pinentry sent a malformed line ({len(line)} bytes)")

    async def _read_line(self) -> bytes:
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            raise PinentryError("the pinentry closed its output before the end of its reply") from None
        except asyncio.LimitOverrunError:
            raise PinentryError(f"the pinentry sent a line longer than {MAX_LINE_BYTES} bytes") from None
        if len(line) > MAX_LINE_BYTES:
            raise PinentryError(f"the pinentry sent a line longer than {MAX_LINE_BYTES} bytes")
        line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
        return line


def _parse_error(line: bytes) -> tuple[int, str]:
    """Split ``ERR code [description]`` into the code and a printable description."""
    fields = line[len(b"ERR ") :].split(b" ", 1)
    if not fields[0].isdigit():
        raise PinentryError("the pinentry sent an ERR line without a numeric error code")
    text = fields[1].decode("utf-8", errors="replace") if len(fields) > 1 else ""
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    if len(text) > MAX_ERROR_TEXT_CHARS:
        text = text[: MAX_ERROR_TEXT_CHARS - 1] + _ELLIPSIS
    return int(fields[0]), text
