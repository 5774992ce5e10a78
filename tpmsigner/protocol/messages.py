"""Messages of the signer protocol, carried inside the Noise channel.

Each Noise message holds exactly one protocol message, in SSH wire encoding
(RFC 4251 section 5):

    byte    message type
    uint32  request id, chosen by the agent and echoed in the reply
    ...     body, by type

Request ids let the signer answer out of order, so a listing is not held up
behind a sign request that waits for a person.  Every decoder rejects
trailing bytes, and every failure is a ProtocolError.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .sshwire import Byte, PacketDecodeError, SshReader, String, UInt32

from ..errors import ProtocolError
from .sessionbind import BindingEvidence, decode_evidence, encode_evidence

MSG_LIST_REQUEST = 1
MSG_LIST_REPLY = 2
MSG_SIGN_REQUEST = 3
MSG_SIGN_REPLY = 4
MSG_FAILURE = 5

UNKNOWN_ID = 0xFFFFFFFF   # pid or uid that the agent could not find out
# The request id of a FAILURE about the whole connection rather than one
# request.  The signer sends it just before it closes a connection that it
# will not serve, and agents never give this id to a request.
CONNECTION_REQUEST_ID = 0xFFFFFFFF


class FailureCode(enum.IntEnum):
    """The reason the signer did not sign. The agent maps every code to SSH_AGENT_FAILURE."""

    DENIED = 1
    WRONG_PIN = 2
    LOCKED_OUT = 3
    TIMED_OUT = 4
    UNKNOWN_KEY = 5
    KEY_DISABLED = 6
    BAD_REQUEST = 7
    TPM_ERROR = 8
    INTERNAL_ERROR = 9
    BUSY = 10
    UNSUPPORTED = 11


@dataclass(frozen=True)
class ProcessInfo:
    """The local process that asked the agent, as the agent reports it."""

    pid: int = UNKNOWN_ID
    uid: int = UNKNOWN_ID
    executable: str = ""
    command_line: str = ""

    def describe(self) -> str:
        """Return a one-line summary such as ``ssh (pid 42, uid 1000): ssh -p 22 host``."""
        if self.pid == UNKNOWN_ID:
            return "unknown process"
        name = self.executable.rsplit("/", 1)[-1] or "?"
        uid = "?" if self.uid == UNKNOWN_ID else str(self.uid)
        summary = f"{name} (pid {self.pid}, uid {uid})"
        return f"{summary}: {self.command_line}" if self.command_line else summary


@dataclass(frozen=True)
class ListRequest:
    request_id: int


@dataclass(frozen=True)
class ListedIdentity:
    key_blob: bytes
    label: str


@dataclass(frozen=True)
class ListReply:
    request_id: int
    identities: tuple[ListedIdentity, ...] = ()


@dataclass(frozen=True)
class SignRequest:
    request_id: int
    key_blob: bytes
    data: bytes
    flags: int = 0
    process: ProcessInfo = field(default_factory=ProcessInfo)
    evidence: BindingEvidence | None = None


@dataclass(frozen=True)
class SignReply:
    request_id: int
    signature: bytes


@dataclass(frozen=True)
class Failure:
    request_id: int
    code: FailureCode
    message: str


Message = ListRequest | ListReply | SignRequest | SignReply | Failure


def encode_message(message: Message) -> bytes:
    """Return the wire form of ``message``."""
    match message:
        case ListRequest(request_id):
            return Byte(MSG_LIST_REQUEST) + UInt32(request_id)
        case ListReply(request_id, identities):
            body = UInt32(len(identities)) + b"".join(
                String(identity.key_blob) + String(identity.label) for identity in identities
            )
            return Byte(MSG_LIST_REPLY) + UInt32(request_id) + body
        case SignRequest(request_id, key_blob, data, flags, process, evidence):
            return (
                Byte(MSG_SIGN_REQUEST)
                + UInt32(request_id)
                + String(key_blob)
                + String(data)
                + UInt32(flags)
                + UInt32(process.pid)
                + UInt32(process.uid)
                + String(process.executable)
                + String(process.command_line)
                + encode_evidence(evidence)
            )
        case SignReply(request_id, signature):
            return Byte(MSG_SIGN_REPLY) + UInt32(request_id) + String(signature)
        case Failure(request_id, code, text):
            return Byte(MSG_FAILURE) + UInt32(request_id) + UInt32(code) + String(text)
    raise TypeError(f"not a signer protocol message: {type(message).__name__}")


def decode_message(payload: bytes) -> Message:
    """Parse one message; raise ProtocolError for anything malformed."""
    try:
        packet = SshReader(payload)
        message_type = packet.get_byte()
        request_id = packet.get_uint32()
        message = _decode_body(message_type, request_id, packet)
        packet.check_end()
    except (PacketDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed signer protocol message: {exc}") from None
    return message


def request_id_of(payload: bytes) -> int | None:
    """Return the request id of a possibly malformed message, if it has one."""
    if len(payload) < 5:
        return None
    return int.from_bytes(payload[1:5], "big")


def _decode_body(message_type: int, request_id: int, packet: SshReader) -> Message:
    if message_type == MSG_LIST_REQUEST:
        return ListRequest(request_id)

    if message_type == MSG_LIST_REPLY:
        count = packet.get_uint32()
        identities = []
        for _ in range(count):
            key_blob = packet.get_string()
            label = packet.get_string().decode("utf-8")
            identities.append(ListedIdentity(key_blob, label))
        return ListReply(request_id, tuple(identities))

    if message_type == MSG_SIGN_REQUEST:
        key_blob = packet.get_string()
        data = packet.get_string()
        flags = packet.get_uint32()
        process = ProcessInfo(
            pid=packet.get_uint32(),
            uid=packet.get_uint32(),
            executable=packet.get_string().decode("utf-8"),
            command_line=packet.get_string().decode("utf-8"),
        )
        evidence = decode_evidence(packet.get_string())
        return SignRequest(request_id, key_blob, data, flags, process, evidence)

    if message_type == MSG_SIGN_REPLY:
        return SignReply(request_id, packet.get_string())

    if message_type == MSG_FAILURE:
        raw_code = packet.get_uint32()
        try:
            code = FailureCode(raw_code)
        except ValueError:
            raise ProtocolError(f"unknown failure code {raw_code}") from None
        return Failure(request_id, code, packet.get_string().decode("utf-8"))

    raise ProtocolError(f"unknown signer protocol message type {message_type}")
