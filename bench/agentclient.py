"""A small blocking ssh-agent client, the same for every agent measured.

Only the two requests the benchmark times (draft-miller-ssh-agent,
sections 4.4 and 4.5): list identities and sign.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

SSH_AGENT_FAILURE = 5
SSH_AGENTC_REQUEST_IDENTITIES = 11
SSH_AGENT_IDENTITIES_ANSWER = 12
SSH_AGENTC_SIGN_REQUEST = 13
SSH_AGENT_SIGN_RESPONSE = 14

REPLY_TIMEOUT = 120.0


class AgentError(Exception):
    """The agent replied SSH_AGENT_FAILURE or something unexpected."""


def _string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _take_string(buffer: bytes, offset: int) -> tuple[bytes, int]:
    (length,) = struct.unpack_from(">I", buffer, offset)
    end = offset + 4 + length
    if end > len(buffer):
        raise AgentError("the agent's reply is truncated")
    return buffer[offset + 4 : end], end


class AgentClient:
    """One connection to an agent's UNIX socket."""

    def __init__(self, path: Path | str, timeout: float = REPLY_TIMEOUT) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(str(path))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, message: bytes) -> bytes:
        self._sock.sendall(_string(message))
        (length,) = struct.unpack(">I", self._receive(4))
        return self._receive(length)

    def _receive(self, count: int) -> bytes:
        chunks = []
        while count:
            chunk = self._sock.recv(count)
            if not chunk:
                raise AgentError("the agent closed the connection")
            chunks.append(chunk)
            count -= len(chunk)
        return b"".join(chunks)

    def list_identities(self) -> list[tuple[bytes, str]]:
        reply = self._request(bytes([SSH_AGENTC_REQUEST_IDENTITIES]))
        if reply[0] != SSH_AGENT_IDENTITIES_ANSWER:
            raise AgentError(f"listing failed: reply type {reply[0]}")
        (count,) = struct.unpack_from(">I", reply, 1)
        offset, identities = 5, []
        for _ in range(count):
            blob, offset = _take_string(reply, offset)
            comment, offset = _take_string(reply, offset)
            identities.append((blob, comment.decode("utf-8", errors="replace")))
        return identities

    def sign(self, key_blob: bytes, data: bytes, flags: int = 0) -> bytes:
        """Return the SSH signature blob of ``data``."""
        reply = self._request(bytes([SSH_AGENTC_SIGN_REQUEST]) + _string(key_blob) + _string(data) + struct.pack(">I", flags))
        if reply[0] != SSH_AGENT_SIGN_RESPONSE:
            raise AgentError(f"signing failed: reply type {reply[0]}")
        signature, _ = _take_string(reply, 1)
        return signature
