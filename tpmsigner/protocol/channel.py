"""The encrypted, mutually authenticated channel between agent and signer.

Noise_XX_25519_ChaChaPoly_SHA256 (the Noise Protocol Framework, revision
34): both sides have a long-term X25519 static key, and each learns the
other's during the handshake.  The agent is the initiator.

    -> e
    <- e, ee, s, es
    -> s, se

The agent checks the signer's static key after the second message, before
it sends its own, so an impostor signer never learns which agent called.
The signer checks the agent's key after the third message and closes the
connection before reading any request when it is not trusted.

Each Noise message travels as a 2-byte big-endian length followed by the
message.  Noise section 3 limits a message to 65,535 bytes, which leaves
65,519 bytes of plaintext after the 16-byte ChaChaPoly tag, so a protocol
message is split into fragments: each plaintext starts with a byte that is
1 when more fragments follow and 0 on the last one.  A message may have at
most MAX_PAYLOAD bytes in all.  A Noise message that fails authentication
closes the channel: the nonce sequence makes a dropped or replayed message
detectable, and there is no way to resume.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from noise.connection import Keypair, NoiseConnection
from cryptography.exceptions import InternalError, InvalidTag, UnsupportedAlgorithm
from noise.exceptions import (
    NoiseHandshakeError,
    NoiseInvalidMessage,
    NoiseMaxNonceError,
    NoiseValueError,
)

from ..errors import ChannelClosedError, ChannelError, ConfigError, PeerNotTrustedError
from ..fsutil import write_private_file

NOISE_PROTOCOL_NAME = b"Noise_XX_25519_ChaChaPoly_SHA256"
# The prologue binds the protocol version into the handshake hash, so an
# agent and a signer that speak different versions fail the handshake.
PROLOGUE = b"tpmsigner signer protocol 1"
# Pairing handshakes use their own prologue, so a pairing handshake and a
# signer session can never complete against each other.
PAIRING_PROLOGUE = b"tpmsigner pairing 1"

MAX_NOISE_MESSAGE = 65535
TAG_SIZE = 16
FRAGMENT_SIZE = MAX_NOISE_MESSAGE - TAG_SIZE - 1    # plaintext after the flag byte
FRAGMENT_MORE = 1
FRAGMENT_LAST = 0
# Largest reassembled protocol message.  It bounds the memory an
# authenticated peer can make the other side hold for one message, and fits
# 256 KiB of data to sign (the agent protocol's own limit) with room to spare.
MAX_PAYLOAD = 1024 * 1024
HANDSHAKE_TIMEOUT = 10.0
PUBLIC_KEY_PREFIX = "tpmsigner-noise-x25519:"

# noiseprotocol 0.3 has no common exception base class, and a malformed
# handshake message can also surface as cryptography's InvalidTag or a
# ValueError from X25519 key parsing.
_NOISE_ERRORS = (
    NoiseHandshakeError,
    NoiseInvalidMessage,
    NoiseMaxNonceError,
    NoiseValueError,
    InvalidTag,
    ValueError,
)


@dataclass(frozen=True)
class StaticKey:
    """A long-term X25519 key pair."""

    private: bytes   # 32 bytes
    public: bytes    # 32 bytes

    @classmethod
    def generate(cls) -> "StaticKey":
        key = X25519PrivateKey.generate()
        return cls(_raw_private(key), _raw_public(key.public_key()))

    @classmethod
    def load_or_create(cls, path: Path) -> "StaticKey":
        """Load the key stored at ``path``, or create and store a new one."""
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError, UnsupportedAlgorithm, OSError) as exc:
                raise ConfigError(f"cannot read the Noise static key {path}: {exc}") from None
            except InternalError:
                # cryptography 50 raises InternalError, whose text blames
                # other libraries, for a PKCS#8 key whose length does not fit
                # its algorithm, such as 32 bytes for Ed448.
                raise ConfigError(
                    f"cannot read the Noise static key {path}: OpenSSL rejected the key data as invalid"
                ) from None
            if not isinstance(key, X25519PrivateKey):
                raise ConfigError(f"{path} does not hold an X25519 private key")
            return cls(_raw_private(key), _raw_public(key.public_key()))

        key = X25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_private_file(path, pem)
        return cls(_raw_private(key), _raw_public(key.public_key()))


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def format_public_key(public: bytes) -> str:
    """Return the one-line text form of a Noise public key, as ``id`` prints it."""
    return PUBLIC_KEY_PREFIX + base64.b64encode(public).decode("ascii")


def parse_public_key(text: str) -> bytes:
    """Parse the text form of a Noise public key; raise ConfigError if invalid."""
    text = text.strip()
    if not text.startswith(PUBLIC_KEY_PREFIX):
        raise ConfigError(f"invalid Noise public key {text[:40]!r}: it must start with {PUBLIC_KEY_PREFIX!r}")
    try:
        public = base64.b64decode(text[len(PUBLIC_KEY_PREFIX) :], validate=True)
    except ValueError:
        raise ConfigError("invalid Noise public key: the part after the prefix is not base64") from None
    if len(public) != 32:
        raise ConfigError(f"invalid Noise public key: {len(public)} bytes instead of 32")
    if public == bytes(32):
        raise ConfigError("invalid Noise public key: the all-zero X25519 point cannot be anyone's key")
    return public


def public_key_fingerprint(public: bytes) -> str:
    """Return a short SHA256 fingerprint of a Noise public key, for logs."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(public).digest()).decode("ascii").rstrip("=")[:16]


class NoiseChannel:
    """A finished Noise session over an asyncio stream pair."""

    def __init__(
        self,
        connection: NoiseConnection,
        remote_static: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self._connection = connection
        self.remote_static = remote_static
        self.handshake_hash = bytes(connection.get_handshake_hash())
        self._reader = reader
        self._writer = writer
        self._send_lock = asyncio.Lock()

    @property
    def peer_address(self) -> str:
        peer = self._writer.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            return f"{peer[0]}:{peer[1]}"
        return str(peer)

    async def send(self, payload: bytes) -> None:
        """Encrypt and send one message of at most MAX_PAYLOAD bytes, in fragments."""
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"message of {len(payload)} bytes exceeds the maximum of {MAX_PAYLOAD}")
        fragments = [payload[start : start + FRAGMENT_SIZE] for start in range(0, len(payload), FRAGMENT_SIZE)] or [b""]
        # Encryption and writes stay under one lock, because the receiver
        # expects ciphertexts in nonce order and the fragments of one
        # message back to back.
        async with self._send_lock:
            for index, fragment in enumerate(fragments):
                flag = FRAGMENT_LAST if index == len(fragments) - 1 else FRAGMENT_MORE
                ciphertext = self._connection.encrypt(bytes([flag]) + fragment)
                await _write_frame(self._writer, ciphertext)

    async def receive(self) -> bytes:
        """Return the next reassembled message.

        Raise ChannelClosedError if the peer closed the connection before
        the first byte of a message, and ChannelError on any other failure,
        a close inside a message included.
        """
        message = bytearray()
        fragments = 0
        while True:
            try:
                ciphertext = await _read_frame(self._reader)
            except ChannelClosedError:
                if fragments:
                    raise ChannelError("the peer closed the connection in the middle of a message") from None
                raise
            fragments += 1
            try:
                plaintext = bytes(self._connection.decrypt(ciphertext))
            except _NOISE_ERRORS:
                raise ChannelError("a message failed authentication; closing the channel") from None
            if not plaintext or plaintext[0] not in (FRAGMENT_MORE, FRAGMENT_LAST):
                raise ChannelError("a message has an invalid fragment header; closing the channel")
            message += plaintext[1:]
            if len(message) > MAX_PAYLOAD:
                raise ChannelError(f"a message exceeds the maximum of {MAX_PAYLOAD} bytes; closing the channel")
            if plaintext[0] == FRAGMENT_LAST:
                return bytes(message)

    async def close(self) -> None:
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), timeout=2.0)
        except (OSError, asyncio.TimeoutError):
            pass


async def _write_frame(writer: asyncio.StreamWriter, message: bytes) -> None:
    writer.write(struct.pack(">H", len(message)) + message)
    try:
        await writer.drain()
    except OSError as exc:
        raise ChannelError(f"sending to the peer failed: {exc}") from None


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    """Read one frame, and raise ChannelClosedError if the connection ends before its first byte."""
    try:
        header = await reader.readexactly(2)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise ChannelClosedError("the peer closed the connection") from None
        raise ChannelError("the peer closed the connection in the middle of a frame") from None
    except OSError as exc:
        raise ChannelError(f"receiving from the peer failed: {exc}") from None

    (length,) = struct.unpack(">H", header)
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ChannelError("the peer closed the connection in the middle of a frame") from None
    except OSError as exc:
        raise ChannelError(f"receiving from the peer failed: {exc}") from None


def _new_connection(static: StaticKey, initiator: bool, prologue: bytes = PROLOGUE) -> NoiseConnection:
    connection = NoiseConnection.from_name(NOISE_PROTOCOL_NAME)
    connection.set_prologue(prologue)
    connection.set_keypair_from_private_bytes(Keypair.STATIC, static.private)
    if initiator:
        connection.set_as_initiator()
    else:
        connection.set_as_responder()
    connection.start_handshake()
    return connection


def _remote_static(connection: NoiseConnection) -> bytes:
    # noiseprotocol 0.3 drops its handshake state when the handshake ends,
    # so the remote static key is read while the state still exists.
    return bytes(connection.noise_protocol.handshake_state.rs.public_bytes)


async def initiate(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    static: StaticKey,
    expected_remote: bytes,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> NoiseChannel:
    """Run the initiator side and check the responder is ``expected_remote``."""

    def check(remote: bytes) -> None:
        if remote != expected_remote:
            raise PeerNotTrustedError(
                f"the signer presented Noise key {public_key_fingerprint(remote)}, not the pinned "
                f"key {public_key_fingerprint(expected_remote)}; if the signer's key really "
                "changed, pin the new one with 'tpmsigner-agent trust'"
            )

    return await _run_handshake(_initiator(reader, writer, static, PROLOGUE, check), timeout)


async def respond(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    static: StaticKey,
    is_trusted: Callable[[bytes], bool],
    timeout: float = HANDSHAKE_TIMEOUT,
) -> NoiseChannel:
    """Run the responder side; raise PeerNotTrustedError for an unknown peer."""

    def check(remote: bytes) -> None:
        if not is_trusted(remote):
            raise PeerNotTrustedError(f"peer key {public_key_fingerprint(remote)} is not allowed")

    return await _run_handshake(_responder(reader, writer, static, PROLOGUE, check), timeout)


async def initiate_pairing(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    static: StaticKey,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> NoiseChannel:
    """Run the initiator side of a pairing handshake, which accepts any responder key.

    The caller must not trust ``remote_static`` until a person has compared
    the codes derived from ``handshake_hash`` on both devices.
    """
    return await _run_handshake(_initiator(reader, writer, static, PAIRING_PROLOGUE, None), timeout)


async def respond_pairing(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    static: StaticKey,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> NoiseChannel:
    """Run the responder side of a pairing handshake, which accepts any initiator key.

    As with initiate_pairing, the remote key is unverified until a person
    confirms the pairing code.
    """
    return await _run_handshake(_responder(reader, writer, static, PAIRING_PROLOGUE, None), timeout)


async def _initiator(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    static: StaticKey,
    prologue: bytes,
    check_remote: Callable[[bytes], None] | None,
) -> NoiseChannel:
    # The responder's key is checked after message 2 and before message 3,
    # which is the one that reveals this side's static key.
    connection = _new_connection(static, initiator=True, prologue=prologue)
    await _write_frame(writer, bytes(connection.write_message()))
    connection.read_message(await _read_frame(reader))
    remote = _remote_static(connection)
    if check_remote is not None:
        check_remote(remote)
    await _write_frame(writer, bytes(connection.write_message()))
    return NoiseChannel(connection, remote, reader, writer)


async def _responder(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    static: StaticKey,
    prologue: bytes,
    check_remote: Callable[[bytes], None] | None,
) -> NoiseChannel:
    connection = _new_connection(static, initiator=False, prologue=prologue)
    connection.read_message(await _read_frame(reader))
    await _write_frame(writer, bytes(connection.write_message()))
    handshake_state = connection.noise_protocol.handshake_state
    connection.read_message(await _read_frame(reader))
    remote = bytes(handshake_state.rs.public_bytes)
    if check_remote is not None:
        check_remote(remote)
    return NoiseChannel(connection, remote, reader, writer)


async def _run_handshake(handshake, timeout: float) -> NoiseChannel:
    try:
        return await asyncio.wait_for(handshake, timeout)
    except asyncio.TimeoutError:
        raise ChannelError(f"the Noise handshake did not finish within {timeout:g} s") from None
    except _NOISE_ERRORS as exc:
        # The library's own text ("Invalid length of public_bytes!", a bare
        # InvalidTag) means nothing to a reader of the log, so only the class
        # name is kept, for debugging.
        raise ChannelError(f"the peer sent an invalid Noise handshake message ({type(exc).__name__})") from None
