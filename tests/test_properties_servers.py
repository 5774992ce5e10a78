"""Property tests of the two servers as their clients reach them.

- The agent: a real AgentServer on a real UNIX socket, pinned to a real
  signer process.  Any bytes a client sends get one reply per complete
  message (SSH_AGENT_FAILURE for anything malformed), or one
  SSH_AGENT_FAILURE and a close for a bad length, never an unexpected
  exception, and the next client is served.
- The signer: a real ``tpmsigner serve`` process, reached over an
  authenticated Noise channel as the paired agent.  Any payload gets one
  reply with its request id (or none when it is too short to have one),
  and the connection stays up.

The signer's approver is ``/bin/false``, so every sign request that reaches
it is refused without a prompt.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from asyncssh.packet import Byte, String, UInt32
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.chain import Chain
from tests.support.mutations import EXTREME_UINT32, mutated, ssh_strings
from tests.support.ports import LOCALHOST
from tests.test_properties_protocol import evidences, messages as signer_messages, process_infos, signed_binds
from tpmsigner.audit import AuditLog
from tpmsigner.protocol import channel
from tpmsigner.protocol.messages import (
    Failure,
    FailureCode,
    ListReply,
    ListRequest,
    SignRequest,
    decode_message,
    encode_message,
    request_id_of,
)
from tpmsigner.protocol.sessionbind import SESSION_BIND_EXTENSION, encode_session_bind
from tpmsigner.store import KeyStore
from tpmsigner_agent import wire
from tpmsigner_agent.config import AgentHome
from tpmsigner_agent.server import AgentServer

PIN = "4711-properties"
IO_TIMEOUT = 30.0
# What the agent may send back: draft-miller-ssh-agent section 6.1.
AGENT_REPLY_TYPES = {
    wire.SSH_AGENT_FAILURE,
    wire.SSH_AGENT_SUCCESS,
    wire.SSH_AGENT_IDENTITIES_ANSWER,
    wire.SSH_AGENT_SIGN_RESPONSE,
    wire.SSH_AGENT_EXTENSION_FAILURE,
}
# Each example talks to real processes, so data generation is a small part
# of its time, which the too_slow health check would misread.
SERVER_SETTINGS = settings(suppress_health_check=[HealthCheck.too_slow])


class ErrorRecords(logging.Handler):
    """Collects log records of ERROR and above, with or without a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def describe(self) -> list[str]:
        return [f"{record.name}: {record.getMessage()}" for record in self.records]


class AgentInThread:
    """An AgentServer on its own event loop thread, serving a UNIX socket."""

    def __init__(self, home: AgentHome, socket_path: Path, audit_path: Path) -> None:
        self.home = home
        self.socket_path = socket_path
        self.audit_path = audit_path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="agent-loop", daemon=True)
        self.server: AgentServer | None = None

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(IO_TIMEOUT)

    def start(self) -> None:
        self.thread.start()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.socket_path))
        sock.listen()

        async def start_server() -> AgentServer:
            server = AgentServer(self.home.signers(), self.home.static_key(), AuditLog(self.audit_path))
            await server.start(sock)
            return server

        self.server = self._run(start_server())

    def stop(self) -> None:
        if self.server is not None:
            self._run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(IO_TIMEOUT)
        self.loop.close()


@pytest.fixture
def signer_chain(chain: Chain) -> Chain:
    chain.keygen("work", PIN)
    chain.pair()
    # Every example opens a new connection, far more than the default
    # handshake limit per address allows.
    chain.start_signer("--max-handshakes-per-minute", "100000", approver="command:/bin/false")
    return chain


@pytest.fixture
def agent(signer_chain: Chain) -> Iterator[tuple[AgentInThread, ErrorRecords]]:
    errors = ErrorRecords()
    logger = logging.getLogger("tpmsigner_agent")
    logger.addHandler(errors)
    with tempfile.TemporaryDirectory(prefix="tpms-", dir="/tmp") as directory:
        running = AgentInThread(
            AgentHome(signer_chain.agent_home), Path(directory) / "agent.sock", Path(directory) / "audit.jsonl"
        )
        running.start()
        try:
            yield running, errors
        finally:
            running.stop()
            logger.removeHandler(errors)


def public_key_blob(chain: Chain) -> bytes:
    return KeyStore(chain.signer_home).get("work").public_key_blob


# ---- the agent ------------------------------------------------------------------


@st.composite
def agent_messages(draw: st.DrawFn, key_blob: bytes) -> bytes:
    """Return one ssh-agent message body (type byte and contents), often malformed."""
    valid = st.one_of(
        st.just(Byte(wire.SSH_AGENTC_REQUEST_IDENTITIES)),
        st.builds(
            lambda blob, data, flags: wire.encode_sign_request(wire.SignRequest(blob, data, flags)),
            st.just(key_blob) | st.binary(max_size=40),
            st.binary(max_size=200),
            st.sampled_from(EXTREME_UINT32),
        ),
        st.just(Byte(wire.SSH_AGENTC_EXTENSION) + String(wire.QUERY_EXTENSION)),
        signed_binds().map(
            lambda bind: Byte(wire.SSH_AGENTC_EXTENSION) + String(SESSION_BIND_EXTENSION) + encode_session_bind(bind)
        ),
        st.builds(lambda name, body: Byte(wire.SSH_AGENTC_EXTENSION) + String(name) + body, ssh_strings(), st.binary(max_size=40)),
        st.builds(lambda kind, body: Byte(kind) + body, st.integers(0, 255), st.binary(max_size=40)),
    )
    return draw(valid | mutated(valid))


def frame_stream(messages: list[bytes], tail: bytes) -> bytes:
    return b"".join(wire.frame(message) for message in messages if message) + tail


def expected_reply_count(stream: bytes) -> tuple[int, bool]:
    """Return (replies, closes early) for a stream, by the agent's framing rules.

    A complete message gets one reply.  A length of 0 or over the maximum
    gets one SSH_AGENT_FAILURE, then the agent closes.  An incomplete
    message at the end gets nothing.
    """
    replies = 0
    offset = 0
    while offset + 4 <= len(stream):
        (length,) = struct.unpack(">I", stream[offset : offset + 4])
        if length == 0 or length > wire.MAX_MESSAGE_LENGTH:
            return replies + 1, True
        if offset + 4 + length > len(stream):
            break
        replies += 1
        offset += 4 + length
    return replies, False


def exchange(socket_path: Path, stream: bytes, chunk_sizes: list[int]) -> list[bytes]:
    """Send ``stream`` in chunks, close the sending side, and return every reply until the agent closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(IO_TIMEOUT)
        client.connect(str(socket_path))
        offset = 0
        for size in chunk_sizes or [len(stream)]:
            try:
                client.sendall(stream[offset : offset + size])
            except BrokenPipeError:
                # The agent closed after a bad length; the replies are read below.
                break
            offset += size
        else:
            try:
                client.sendall(stream[offset:])
                client.shutdown(socket.SHUT_WR)
            except BrokenPipeError:
                pass
        received = b""
        while chunk := client.recv(65536):
            received += chunk

    replies = []
    while received:
        assert len(received) >= 4, f"a reply frame is cut short: {received!r}"
        (length,) = struct.unpack(">I", received[:4])
        assert 0 < length <= len(received) - 4, f"a reply frame is cut short: {received!r}"
        replies.append(received[4 : 4 + length])
        received = received[4 + length :]
    return replies


def test_agent_answers_any_client_bytes(signer_chain: Chain, agent) -> None:
    running, errors = agent
    key_blob = public_key_blob(signer_chain)

    @SERVER_SETTINGS
    @given(
        st.lists(agent_messages(key_blob), max_size=4),
        st.one_of(
            st.just(b""),
            st.binary(max_size=12),
            st.sampled_from(EXTREME_UINT32).map(lambda length: UInt32(length) + Byte(11)),
        ),
        st.lists(st.integers(1, 64), max_size=4),
    )
    def check(messages: list[bytes], tail: bytes, chunk_sizes: list[int]) -> None:
        stream = frame_stream(messages, tail)

        replies = exchange(running.socket_path, stream, chunk_sizes)

        count, closes_early = expected_reply_count(stream)
        assert len(replies) == count
        for reply in replies:
            assert reply[0] in AGENT_REPLY_TYPES
        if closes_early:
            assert replies[-1] == wire.FAILURE
        for message, reply in zip((message for message in messages if message), replies):
            if message == Byte(wire.SSH_AGENTC_REQUEST_IDENTITIES):
                assert wire.decode_identities_answer(reply[1:]) == [(key_blob, "work")]
            elif message[0] == wire.SSH_AGENTC_SIGN_REQUEST:
                # The approver refuses every request that reaches it.
                assert reply == wire.FAILURE
        assert errors.describe() == []

        # The agent keeps serving: a fresh client gets the listing.
        listing = exchange(running.socket_path, wire.frame(Byte(wire.SSH_AGENTC_REQUEST_IDENTITIES)), [])
        assert wire.decode_identities_answer(listing[0][1:]) == [(key_blob, "work")]

    check()
    assert signer_chain.signer is not None
    assert "Traceback" not in signer_chain.signer.log_text()
    # Some requests went all the way to the approver, which refused them.
    outcomes = [record["outcome"] for record in AuditLog(running.audit_path).records()]
    assert "denied" in outcomes


# ---- the signer ------------------------------------------------------------------


async def _signer_exchange(chain: Chain, payloads: list[bytes]) -> list[bytes | None]:
    """Send each payload on one channel and return its reply, or None for a payload without a request id."""
    home = AgentHome(chain.agent_home)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(LOCALHOST, chain.signer_port), IO_TIMEOUT)
    secure = await channel.initiate(reader, writer, home.static_key(), home.signers()[0].public_key)
    try:
        replies: list[bytes | None] = []
        for payload in payloads:
            await secure.send(payload)
            if request_id_of(payload) is None:
                replies.append(None)
                continue
            replies.append(await asyncio.wait_for(secure.receive(), IO_TIMEOUT))
        # The channel is still up: a listing works.
        await secure.send(encode_message(ListRequest(0xABCDEF)))
        replies.append(await asyncio.wait_for(secure.receive(), IO_TIMEOUT))
        return replies
    finally:
        await secure.close()


def test_signer_answers_any_payload(signer_chain: Chain) -> None:
    held_key_requests = st.builds(
        SignRequest,
        st.integers(0, 2**32 - 1),
        st.just(public_key_blob(signer_chain)),
        st.binary(max_size=100),
        st.integers(0, 2**32 - 1),
        process_infos,
        st.none() | evidences,
    )
    encoded = (signer_messages | held_key_requests).map(encode_message)
    payloads = st.one_of(held_key_requests.map(encode_message), encoded, mutated(encoded), st.binary(max_size=64))

    @settings(SERVER_SETTINGS, max_examples=min(settings.default.max_examples, 100))
    @given(st.lists(payloads, min_size=1, max_size=4))
    def check(payloads: list[bytes]) -> None:
        replies = asyncio.run(_signer_exchange(signer_chain, payloads))

        for payload, reply in zip(payloads, replies):
            if reply is None:
                continue
            message = decode_message(reply)
            assert message.request_id == request_id_of(payload)
            assert isinstance(message, (ListReply, Failure))
            if isinstance(message, Failure):
                assert message.code in (FailureCode.BAD_REQUEST, FailureCode.UNKNOWN_KEY, FailureCode.DENIED), message
        final = decode_message(replies[-1])
        assert isinstance(final, ListReply)
        assert [identity.label for identity in final.identities] == ["work"]

    check()
    outcomes = [record["outcome"] for record in AuditLog(signer_chain.signer_audit_log).records()]
    assert "denied" in outcomes
    assert signer_chain.signer is not None
    log = signer_chain.signer.log_text()
    assert "Traceback" not in log
    assert "unexpected error" not in log
