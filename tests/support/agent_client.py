"""An asyncio ssh-agent client that frames messages by hand, and a signature check.

Load and limit tests open many connections to the agent socket and need to
see every reply byte for byte, which asyncssh's agent client hides.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from asyncssh.packet import Byte, SSHPacket, String, UInt32
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

# draft-miller-ssh-agent section 6.1, message numbers.
SSH_AGENT_FAILURE = 5
SSH_AGENTC_REQUEST_IDENTITIES = 11
SSH_AGENT_IDENTITIES_ANSWER = 12
SSH_AGENTC_SIGN_REQUEST = 13
SSH_AGENT_SIGN_RESPONSE = 14

REPLY_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class AgentReply:
    """One reply message: its type and the bytes after the type."""

    message_type: int
    body: bytes


class AsyncAgentConnection:
    """One connection to an ssh-agent socket; each request reads exactly one reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: Path | str) -> "AsyncAgentConnection":
        # A blocking connect waits while the listen queue is full, as ssh's
        # does.  asyncio's own connect takes EAGAIN from a UNIX socket for a
        # connection in progress (CPython 3.11) and returns a socket that is
        # not connected.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(str(path))
        except OSError:
            sock.close()
            raise
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    async def request(self, message: bytes, timeout: float = REPLY_TIMEOUT) -> AgentReply:
        self.writer.write(struct.pack(">I", len(message)) + message)
        await self.writer.drain()
        return await asyncio.wait_for(self.read_reply(), timeout)

    async def read_reply(self) -> AgentReply:
        (length,) = struct.unpack(">I", await self.reader.readexactly(4))
        message = await self.reader.readexactly(length)
        return AgentReply(message[0], message[1:])

    async def list_identities(self, timeout: float = REPLY_TIMEOUT) -> list[tuple[bytes, str]]:
        """Return (key blob, comment) pairs; raise AssertionError on any other reply."""
        reply = await self.request(Byte(SSH_AGENTC_REQUEST_IDENTITIES), timeout)
        if reply.message_type != SSH_AGENT_IDENTITIES_ANSWER:
            raise AssertionError(f"expected SSH_AGENT_IDENTITIES_ANSWER, got message type {reply.message_type}")
        packet = SSHPacket(reply.body)
        identities = [(packet.get_string(), packet.get_string().decode()) for _ in range(packet.get_uint32())]
        packet.check_end()
        return identities

    async def sign(self, key_blob: bytes, data: bytes, flags: int = 0, timeout: float = REPLY_TIMEOUT) -> AgentReply:
        message = Byte(SSH_AGENTC_SIGN_REQUEST) + String(key_blob) + String(data) + UInt32(flags)
        return await self.request(message, timeout)

    async def is_closed_by_peer(self, timeout: float = 10.0) -> bool:
        """Return True if the agent closes the connection within ``timeout`` without sending anything."""
        return await asyncio.wait_for(self.reader.read(1), timeout) == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def signature_of_response(reply: AgentReply) -> bytes:
    """Return the signature blob of an SSH_AGENT_SIGN_RESPONSE."""
    if reply.message_type != SSH_AGENT_SIGN_RESPONSE:
        raise AssertionError(f"expected SSH_AGENT_SIGN_RESPONSE, got message type {reply.message_type}")
    packet = SSHPacket(reply.body)
    signature = packet.get_string()
    packet.check_end()
    return signature


def ecdsa_signature_verifies(public_key_line: str, data: bytes, signature_blob: bytes) -> bool:
    """Check an SSH ecdsa-sha2-nistp256 signature blob (RFC 5656 section 3.1.2) with cryptography."""
    public_key = serialization.load_ssh_public_key(public_key_line.encode())
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise TypeError(f"expected an ECDSA public key, got {type(public_key).__name__}")
    packet = SSHPacket(signature_blob)
    if packet.get_string() != b"ecdsa-sha2-nistp256":
        return False
    inner = SSHPacket(packet.get_string())
    packet.check_end()
    r, s = inner.get_mpint(), inner.get_mpint()
    inner.check_end()
    try:
        public_key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def key_blob_of(public_key_line: str) -> bytes:
    """Return the wire-format public key blob of an OpenSSH public key line."""
    return base64.b64decode(public_key_line.split()[1])
