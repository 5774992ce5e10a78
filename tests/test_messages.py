"""Tests of the signer protocol messages and of the agent's ssh-agent decoders."""

import struct

import pytest

from tpmsigner.errors import ProtocolError
from tpmsigner.protocol.messages import (
    UNKNOWN_ID,
    Failure,
    FailureCode,
    ListedIdentity,
    ListReply,
    ListRequest,
    ProcessInfo,
    SignReply,
    SignRequest,
    decode_message,
    encode_message,
    request_id_of,
)
from tpmsigner.protocol.sshkeys import SSH_AGENT_RSA_SHA2_256
from tpmsigner_agent import wire

PROCESS = ProcessInfo(pid=4242, uid=1000, executable="/usr/bin/ssh", command_line="ssh -p 2222 host")

MESSAGES = {
    "list request": ListRequest(7),
    "list reply empty": ListReply(8),
    "list reply two": ListReply(
        9, (ListedIdentity(b"\x00\x00\x00\x13ecdsa-sha2-nistp256", "work"), ListedIdentity(b"blob", "gît"))
    ),
    "sign request": SignRequest(10, b"key blob", b"data to sign", 0, PROCESS),
    "sign request unknown process": SignRequest(11, b"key", b"", 2),
    "sign request max ids": SignRequest(0xFFFFFFFF, b"k", b"d", 0xFFFFFFFF, ProcessInfo(0, 0, "", "")),
    "sign reply": SignReply(12, b"signature blob"),
    "sign reply empty": SignReply(0, b""),
    **{f"failure {code.name}": Failure(100 + code, code, f"{code.name} happened") for code in FailureCode},
}


def ssh_string(value: bytes | str) -> bytes:
    if isinstance(value, str):
        value = value.encode("utf-8")
    return struct.pack(">I", len(value)) + value


@pytest.mark.parametrize("message", MESSAGES.values(), ids=MESSAGES.keys())
def test_message_round_trip(message) -> None:
    decoded = decode_message(encode_message(message))

    assert decoded == message


@pytest.mark.parametrize("message", MESSAGES.values(), ids=MESSAGES.keys())
def test_message_rejects_trailing_byte(message) -> None:
    with pytest.raises(ProtocolError):
        decode_message(encode_message(message) + b"\x00")


@pytest.mark.parametrize("message", MESSAGES.values(), ids=MESSAGES.keys())
def test_message_rejects_every_truncation(message) -> None:
    payload = encode_message(message)

    for length in range(len(payload)):
        with pytest.raises(ProtocolError):
            decode_message(payload[:length])


@pytest.mark.parametrize("message", MESSAGES.values(), ids=MESSAGES.keys())
def test_request_id_of_encoded_message(message) -> None:
    assert request_id_of(encode_message(message)) == message.request_id


def test_sign_request_exact_bytes() -> None:
    expected = (
        b"\x03"
        + struct.pack(">I", 10)
        + ssh_string(b"key blob")
        + ssh_string(b"data to sign")
        + struct.pack(">I", 0)
        + struct.pack(">I", 4242)
        + struct.pack(">I", 1000)
        + ssh_string("/usr/bin/ssh")
        + ssh_string("ssh -p 2222 host")
        + ssh_string(b"")   # no session binding evidence
    )

    assert encode_message(MESSAGES["sign request"]) == expected


def test_list_reply_exact_bytes() -> None:
    message = ListReply(9, (ListedIdentity(b"blob", "label"),))

    expected = b"\x02" + struct.pack(">II", 9, 1) + ssh_string(b"blob") + ssh_string("label")

    assert encode_message(message) == expected


def test_failure_exact_bytes() -> None:
    message = Failure(3, FailureCode.WRONG_PIN, "wrong PIN")

    expected = b"\x05" + struct.pack(">II", 3, 2) + ssh_string("wrong PIN")

    assert encode_message(message) == expected


def test_decoded_failure_code_is_enum() -> None:
    decoded = decode_message(b"\x05" + struct.pack(">II", 3, 4) + ssh_string("late"))

    assert decoded.code is FailureCode.TIMED_OUT


@pytest.mark.parametrize("message_type", [0, 6, 99, 255])
def test_unknown_message_type_rejected(message_type: int) -> None:
    payload = bytes([message_type]) + struct.pack(">I", 1)

    with pytest.raises(ProtocolError, match=f"unknown signer protocol message type {message_type}"):
        decode_message(payload)


@pytest.mark.parametrize("code", [0, max(FailureCode) + 1, 0xFFFFFFFF])
def test_unknown_failure_code_rejected(code: int) -> None:
    payload = b"\x05" + struct.pack(">II", 1, code) + ssh_string("text")

    with pytest.raises(ProtocolError, match=f"unknown failure code {code}"):
        decode_message(payload)


def test_list_reply_count_beyond_data_rejected() -> None:
    payload = b"\x02" + struct.pack(">II", 1, 0xFFFFFFFF)

    with pytest.raises(ProtocolError):
        decode_message(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x02" + struct.pack(">II", 1, 1) + ssh_string(b"blob") + ssh_string(b"\xff"),
        b"\x03" + struct.pack(">I", 1) + ssh_string(b"k") + ssh_string(b"d") + struct.pack(">III", 0, 1, 1)
        + ssh_string(b"\xc3") + ssh_string(b""),
        b"\x05" + struct.pack(">II", 1, 1) + ssh_string(b"\x80"),
    ],
    ids=["label", "executable", "failure text"],
)
def test_invalid_utf8_rejected(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_message(payload)


def test_encode_rejects_other_objects() -> None:
    with pytest.raises(TypeError):
        encode_message("not a message")


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", None),
        (b"\x01\x00\x00\x00", None),
        (b"\x01\x00\x00\x00\x2a", 42),
        (b"\x63\x12\x34\x56\x78garbage", 0x12345678),
    ],
    ids=["empty", "four bytes", "list request", "malformed"],
)
def test_request_id_of(payload: bytes, expected: int | None) -> None:
    assert request_id_of(payload) == expected


@pytest.mark.parametrize(
    ("process", "expected"),
    [
        (ProcessInfo(), "unknown process"),
        (PROCESS, "ssh (pid 4242, uid 1000): ssh -p 2222 host"),
        (ProcessInfo(pid=5, uid=UNKNOWN_ID, executable="/bin/git"), "git (pid 5, uid ?)"),
        (ProcessInfo(pid=5, uid=0, executable=""), "? (pid 5, uid 0)"),
    ],
    ids=["unknown", "full", "unknown uid", "no executable"],
)
def test_process_describe(process: ProcessInfo, expected: str) -> None:
    assert process.describe() == expected


def test_wire_sign_request_round_trip() -> None:
    request = wire.SignRequest(b"key blob", b"data", SSH_AGENT_RSA_SHA2_256)

    encoded = wire.encode_sign_request(request)

    assert encoded[0] == wire.SSH_AGENTC_SIGN_REQUEST
    assert wire.decode_sign_request(encoded[1:]) == request


def test_wire_sign_request_rejects_trailing_byte() -> None:
    encoded = wire.encode_sign_request(wire.SignRequest(b"key", b"data", 0))

    with pytest.raises(ProtocolError):
        wire.decode_sign_request(encoded[1:] + b"\x00")


def test_wire_identities_round_trip() -> None:
    identities = [(b"blob one", "first"), (b"blob two", "zweite Schlüssel")]

    encoded = wire.encode_identities_answer(identities)

    assert encoded[0] == wire.SSH_AGENT_IDENTITIES_ANSWER
    assert wire.decode_identities_answer(encoded[1:]) == identities


def test_wire_identities_rejects_trailing_byte() -> None:
    encoded = wire.encode_identities_answer([(b"blob", "comment")])

    with pytest.raises(ProtocolError):
        wire.decode_identities_answer(encoded[1:] + b"\x00")


def test_wire_frame_prefixes_length() -> None:
    assert wire.frame(b"\x0b") == b"\x00\x00\x00\x01\x0b"
