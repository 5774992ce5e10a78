"""Bad and unusual input on the agent socket: one reply each, or a clean close."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from asyncssh.packet import Byte, String, UInt32

from tests.support.chain import Chain

PIN = "4711-agent-input"
FAILURE = b"\x05"
IDENTITIES_ANSWER = 12
READ_TIMEOUT = 10.0


class RawAgentClient:
    """Speaks the ssh-agent framing by hand, to send what real clients never do."""

    def __init__(self, path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(READ_TIMEOUT)
        self.sock.connect(str(path))

    def send_message(self, message: bytes) -> None:
        self.sock.sendall(struct.pack(">I", len(message)) + message)

    def _read_exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise EOFError(f"connection closed after {len(data)} of {count} bytes")
            data += chunk
        return data

    def read_reply(self) -> bytes:
        (length,) = struct.unpack(">I", self._read_exactly(4))
        return self._read_exactly(length)

    def is_closed_by_peer(self) -> bool:
        return self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def running_chain(chain: Chain) -> Chain:
    chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    chain.start_agent()
    return chain


@pytest.fixture
def client(running_chain: Chain):
    raw = RawAgentClient(running_chain.agent_socket)
    yield raw
    raw.close()


def request_identities() -> bytes:
    return Byte(11)


def assert_identities_answer(reply: bytes) -> None:
    assert reply[0] == IDENTITIES_ANSWER
    assert struct.unpack(">I", reply[1:5])[0] == 1


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(Byte(200), id="unknown-type"),
        pytest.param(Byte(27) + String("session-bind@openssh.com") + String(b"x" * 40), id="session-bind"),
        pytest.param(Byte(27) + String("unknown@example.com"), id="unknown-extension"),
        pytest.param(Byte(17) + String("ssh-ed25519") + String(b"k" * 32), id="add-identity"),
        pytest.param(Byte(19), id="remove-all"),
        pytest.param(Byte(22) + String("passphrase"), id="lock"),
        pytest.param(Byte(13) + String(b"truncated"), id="truncated-sign-request"),
        pytest.param(Byte(13) + String(b"k") + String(b"d") + UInt32(0) + b"extra", id="sign-request-trailing-bytes"),
        pytest.param(Byte(13) + String(b"not-a-key") + String(b"data") + UInt32(0), id="sign-unknown-key"),
    ],
)
def test_unsupported_message_gets_one_failure(running_chain: Chain, client: RawAgentClient, message: bytes) -> None:
    client.send_message(message)
    assert client.read_reply() == FAILURE

    client.send_message(request_identities())
    assert_identities_answer(client.read_reply())
    assert running_chain.approver_requests() == []


def test_requests_in_one_write_get_ordered_replies(client: RawAgentClient) -> None:
    batch = b"".join(
        struct.pack(">I", len(message)) + message
        for message in (request_identities(), Byte(200), request_identities(), Byte(27) + String("other@example.com"))
    )
    client.sock.sendall(batch)

    assert_identities_answer(client.read_reply())
    assert client.read_reply() == FAILURE
    assert_identities_answer(client.read_reply())
    assert client.read_reply() == FAILURE


def test_message_sent_byte_by_byte_is_answered(client: RawAgentClient) -> None:
    framed = struct.pack(">I", 1) + request_identities()
    for byte in framed:
        client.sock.sendall(bytes([byte]))
        time.sleep(0.01)

    assert_identities_answer(client.read_reply())


@pytest.mark.parametrize("length", [0, 256 * 1024 + 1, 0xFFFFFFFF])
def test_bad_declared_length_fails_and_closes(running_chain: Chain, client: RawAgentClient, length: int) -> None:
    client.sock.sendall(struct.pack(">I", length) + b"\x0b")

    assert client.read_reply() == FAILURE
    assert client.is_closed_by_peer()

    # The agent itself keeps serving other connections.
    other = RawAgentClient(running_chain.agent_socket)
    try:
        other.send_message(request_identities())
        assert_identities_answer(other.read_reply())
    finally:
        other.close()


def test_largest_allowed_message_is_answered(client: RawAgentClient) -> None:
    # 256 KiB exactly is allowed; the sign request names no key we hold.
    padding = 256 * 1024 - 17   # type byte, two string lengths, "kkkk", flags
    message = Byte(13) + String(b"k" * 4) + String(b"d" * padding) + UInt32(0)
    assert len(message) == 256 * 1024
    client.send_message(message)
    assert client.read_reply() == FAILURE


def test_truncated_frame_then_close_leaves_agent_serving(running_chain: Chain) -> None:
    broken = RawAgentClient(running_chain.agent_socket)
    broken.sock.sendall(struct.pack(">I", 100) + b"\x0b" * 10)
    broken.close()

    fresh = RawAgentClient(running_chain.agent_socket)
    try:
        fresh.send_message(request_identities())
        assert_identities_answer(fresh.read_reply())
    finally:
        fresh.close()
    assert running_chain.agent is not None
    assert running_chain.agent.is_running()
    assert "Traceback" not in running_chain.agent.log_text()
