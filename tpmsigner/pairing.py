"""The pairing exchange shared by ``tpmsigner pair`` and ``tpmsigner-agent pair``.

Pairing runs a Noise_XX handshake with the prologue ``tpmsigner pairing 1``
that accepts any remote static key.  Both sides derive a six-digit code
from the handshake hash, and a person compares the two codes and confirms
on both devices.  A man in the middle would have to run two handshakes with
different hashes, so the codes would differ.  Only when both people confirm
does each side pin the other's static key.

Messages travel inside the Noise channel, in SSH wire encoding:

- ``HELLO`` (1): ``string name``, the name the sender proposes for itself;
- ``CONFIRM`` (2): ``byte accepted`` (1 or 0), ``string reason``;
- ``RESULT`` (3): ``byte paired`` (1 or 0), ``string message``, sent by the
  signer after it has stored the agent's key, or failed to.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import sys
from dataclasses import dataclass

from .protocol.sshwire import Byte, PacketDecodeError, SshReader, String

from .errors import ChannelError, ConfigError, ProtocolError
from .protocol.channel import NoiseChannel

CODE_LABEL = b"tpmsigner pairing code"
CODE_DIGITS = 6
DEFAULT_PAIRING_PORT = 7811
DEFAULT_PAIRING_TIMEOUT = 120.0
# A name longer than a device name could ever be is a malformed message.
MAX_NAME_BYTES = 255
MAX_REASON_BYTES = 1024

HELLO = 1
CONFIRM = 2
RESULT = 3

_NAME_CHARACTER = re.compile(r"[^A-Za-z0-9._@+-]")


class PairingRefusedError(ConfigError):
    """A person refused the pairing, or the other side ended it."""


@dataclass(frozen=True)
class Hello:
    name: str


@dataclass(frozen=True)
class Confirm:
    accepted: bool
    reason: str = ""


@dataclass(frozen=True)
class Result:
    paired: bool
    message: str


PairingMessage = Hello | Confirm | Result


def pairing_code(handshake_hash: bytes) -> str:
    """Return the six-digit code that both sides show for one pairing handshake."""
    digest = hashlib.sha256(CODE_LABEL + handshake_hash).digest()
    return f"{int.from_bytes(digest[:4], 'big') % 10**CODE_DIGITS:0{CODE_DIGITS}d}"


def default_name() -> str:
    """Return this host's name, cut to its first label and to the characters names allow."""
    label = socket.gethostname().split(".")[0]
    name = _NAME_CHARACTER.sub("-", label).lstrip("._@+-")[:64]
    return name or "unnamed"


def encode(message: PairingMessage) -> bytes:
    if isinstance(message, Hello):
        return Byte(HELLO) + String(message.name)
    if isinstance(message, Confirm):
        return Byte(CONFIRM) + Byte(1 if message.accepted else 0) + String(message.reason)
    return Byte(RESULT) + Byte(1 if message.paired else 0) + String(message.message)


def decode(payload: bytes) -> PairingMessage:
    """Parse one pairing message; raise ProtocolError when it is malformed."""
    packet = SshReader(payload)
    try:
        message_type = packet.get_byte()
        if message_type == HELLO:
            message: PairingMessage = Hello(_text(packet.get_string(), MAX_NAME_BYTES, "name"))
        elif message_type in (CONFIRM, RESULT):
            flag = packet.get_byte()
            if flag not in (0, 1):
                raise ProtocolError(f"invalid flag byte {flag} in pairing message type {message_type}")
            text = _text(packet.get_string(), MAX_REASON_BYTES, "message")
            message = Confirm(flag == 1, text) if message_type == CONFIRM else Result(flag == 1, text)
        else:
            raise ProtocolError(f"unknown pairing message type {message_type}")
        packet.check_end()
    except PacketDecodeError as exc:
        raise ProtocolError(f"malformed pairing message: {exc}") from None
    return message


def _text(value: bytes, limit: int, what: str) -> str:
    if len(value) > limit:
        raise ProtocolError(f"the {what} in a pairing message has {len(value)} bytes, over the limit of {limit}")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"the {what} in a pairing message is not valid UTF-8") from None


async def send(secure: NoiseChannel, message: PairingMessage) -> None:
    await secure.send(encode(message))


async def receive(secure: NoiseChannel) -> PairingMessage:
    return decode(await secure.receive())


async def receive_hello(secure: NoiseChannel) -> Hello:
    """Wait for the peer's HELLO; raise PairingRefusedError if it sends a refusal instead."""
    message = await receive(secure)
    if isinstance(message, Confirm) and not message.accepted:
        raise PairingRefusedError(f"the other device ended the pairing: {message.reason or 'no reason given'}")
    if not isinstance(message, Hello):
        raise ProtocolError(f"expected a HELLO pairing message, received {type(message).__name__}")
    return message


async def refuse(secure: NoiseChannel, reason: str) -> None:
    """Tell the peer that this side ends the pairing, ignoring a broken channel."""
    try:
        await send(secure, Confirm(False, reason))
    except ChannelError:
        pass


def require_terminal() -> None:
    """Raise ConfigError unless stdin is a terminal, where a person can confirm the code."""
    if not os.isatty(sys.stdin.fileno()):
        raise ConfigError(
            "pairing needs a terminal on stdin, because a person must compare the codes and confirm; "
            "run the command in a terminal, or use 'allow' and 'trust' for scripted set-ups"
        )


async def _read_terminal_line() -> str:
    """Read one line from stdin without blocking the event loop."""
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    line: asyncio.Future[bytes] = loop.create_future()
    buffer = bytearray()

    def on_readable() -> None:
        chunk = os.read(fd, 1024)
        buffer.extend(chunk)
        if (not chunk or b"\n" in buffer) and not line.done():
            line.set_result(bytes(buffer))

    loop.add_reader(fd, on_readable)
    try:
        return (await line).decode("utf-8", errors="replace")
    finally:
        loop.remove_reader(fd)


async def ask_yes_no(question: str) -> bool:
    """Ask a yes/no question on the terminal; anything but y or yes means no."""
    print(f"{question} [y/N] ", end="", flush=True)
    answer = await _read_terminal_line()
    return answer.strip().lower() in ("y", "yes")


async def confirm_code(secure: NoiseChannel, code: str) -> None:
    """Show ``code``, ask the person to compare it, and exchange both sides' answers.

    Returns when both sides accepted.  Raises PairingRefusedError when
    either side refused; a refusal from the peer that arrives while the
    question is still open ends the question at once.
    """
    print(f"Pairing code: {code}", flush=True)
    print("Compare it with the code on the other device.", flush=True)
    answer = asyncio.create_task(ask_yes_no("Do the codes match?"))
    peer = asyncio.create_task(receive(secure))
    try:
        await asyncio.wait({answer, peer}, return_when=asyncio.FIRST_COMPLETED)
        if peer.done() and not answer.done():
            _check_peer_confirm(peer.result())
        accepted = await answer
        await send(secure, Confirm(accepted, "" if accepted else "the codes were rejected on the other device"))
        if not accepted:
            raise PairingRefusedError("pairing rejected here; nothing was stored")
        _check_peer_confirm(await peer)
    finally:
        for task in (answer, peer):
            task.cancel()
        # A peer task that failed after a local refusal is of no interest.
        await asyncio.gather(answer, peer, return_exceptions=True)


def _check_peer_confirm(message: PairingMessage) -> None:
    if not isinstance(message, Confirm):
        raise ProtocolError(f"expected a CONFIRM pairing message, received {type(message).__name__}")
    if not message.accepted:
        print(flush=True)
        raise PairingRefusedError(
            f"the other device rejected the pairing ({message.reason or 'no reason given'}); nothing was stored"
        )
