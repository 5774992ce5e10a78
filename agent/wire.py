"""The ssh-agent protocol, as draft-miller-ssh-agent and OpenSSH's
PROTOCOL.agent define it.

Every message is ``uint32 length, byte type, contents``.  Only the client
messages this agent serves are decoded; any other type gets
SSH_AGENT_FAILURE.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpmsigner.protocol.sshwire import Byte, PacketDecodeError, SshReader, String, UInt32

from tpmsigner.errors import ProtocolError

# draft-miller-ssh-agent section 6.1, message numbers.
SSH_AGENT_FAILURE = 5
SSH_AGENT_SUCCESS = 6
SSH_AGENTC_REQUEST_IDENTITIES = 11
SSH_AGENT_IDENTITIES_ANSWER = 12
SSH_AGENTC_SIGN_REQUEST = 13
SSH_AGENT_SIGN_RESPONSE = 14
SSH_AGENTC_EXTENSION = 27
SSH_AGENT_EXTENSION_FAILURE = 28

# OpenSSH's ssh-agent refuses messages over 256 KiB (AGENT_MAX_LEN); so do we.
# Its clients reject longer replies too (MAX_AGENT_REPLY_LEN in authfd.c).
MAX_MESSAGE_LENGTH = 256 * 1024
# OpenSSH's clients reject an SSH_AGENT_IDENTITIES_ANSWER with more keys
# (MAX_AGENT_IDENTITIES in authfd.c, OpenSSH 9.2).
MAX_IDENTITIES = 2048


@dataclass(frozen=True)
class SignRequest:
    """SSH_AGENTC_SIGN_REQUEST (draft-miller-ssh-agent section 4.5)."""

    key_blob: bytes
    data: bytes
    flags: int


def decode_sign_request(body: bytes) -> SignRequest:
    """Parse the contents after the type byte; reject leftover bytes."""
    try:
        packet = SshReader(body)
        request = SignRequest(packet.get_string(), packet.get_string(), packet.get_uint32())
        packet.check_end()
    except PacketDecodeError as exc:
        raise ProtocolError(f"malformed sign request: {exc}") from None
    return request


def encode_sign_request(request: SignRequest) -> bytes:
    return Byte(SSH_AGENTC_SIGN_REQUEST) + String(request.key_blob) + String(request.data) + UInt32(request.flags)


def encode_identities_answer(identities: list[tuple[bytes, str]]) -> bytes:
    """SSH_AGENT_IDENTITIES_ANSWER: count, then (key blob, comment) pairs."""
    body = b"".join(String(blob) + String(comment) for blob, comment in identities)
    return Byte(SSH_AGENT_IDENTITIES_ANSWER) + UInt32(len(identities)) + body


def decode_identities_answer(body: bytes) -> list[tuple[bytes, str]]:
    try:
        packet = SshReader(body)
        count = packet.get_uint32()
        identities = [(packet.get_string(), packet.get_string().decode("utf-8")) for _ in range(count)]
        packet.check_end()
    except (PacketDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed SSH_AGENT_IDENTITIES_ANSWER: {exc}") from None
    return identities


def encode_sign_response(signature: bytes) -> bytes:
    return Byte(SSH_AGENT_SIGN_RESPONSE) + String(signature)


def frame(message: bytes) -> bytes:
    """Prefix a message with its uint32 length."""
    return UInt32(len(message)) + message


FAILURE = Byte(SSH_AGENT_FAILURE)
SUCCESS = Byte(SSH_AGENT_SUCCESS)
EXTENSION_FAILURE = Byte(SSH_AGENT_EXTENSION_FAILURE)

QUERY_EXTENSION = b"query"


def decode_extension(body: bytes) -> tuple[bytes, bytes]:
    """Split SSH_AGENTC_EXTENSION contents into (name, extension-specific contents)."""
    try:
        packet = SshReader(body)
        name = packet.get_string()
    except PacketDecodeError as exc:
        raise ProtocolError(f"malformed extension request: {exc}") from None
    return name, packet.get_remaining_payload()


def encode_query_reply(names: list[bytes]) -> bytes:
    """Reply to the "query" extension: SSH_AGENT_SUCCESS and the extension names.

    This is the form asyncssh's ``query_extensions()`` reads; OpenSSH 9.2's
    ssh and ssh-add do not send "query".
    """
    return SUCCESS + b"".join(String(name) for name in names)
