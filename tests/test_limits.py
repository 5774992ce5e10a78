"""Every limit of the agent and the signer, reached against the real daemons on loopback.

Each test drives a limit with real clients (OpenSSH's ssh-add, raw ssh-agent
connections, Noise connections with a paired device key) and checks what
the peer over the limit gets, a failure reply or a clean close, the log line
on the daemon, and that other peers keep being served.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import tpmsigner
from tests.support import LOCALHOST, start_swtpm
from tests.support.agent_client import (
    SSH_AGENT_FAILURE,
    AsyncAgentConnection,
    ecdsa_signature_verifies,
    key_blob_of,
    signature_of_response,
)
from tests.support.chain import Chain
from tests.support.processes import wait_until
from tpmsigner.commands.signer import NOISE_KEY_FILE
from tpmsigner.errors import ChannelError, SignerError
from tpmsigner.protocol import channel
from tpmsigner.protocol.messages import (
    CONNECTION_REQUEST_ID,
    Failure,
    FailureCode,
    ListReply,
    ListRequest,
    ProcessInfo,
    SignReply,
    SignRequest,
    decode_message,
    encode_message,
)
from tpmsigner.signer import admission, server as signer_server
from tpmsigner.tpm import Tpm
from tpmsigner_agent import server as agent_server
from tpmsigner_agent import signer_client, wire
from tpmsigner_agent.config import AgentHome, PinnedSigner

PIN = "4711-limits"
REPLY_TIMEOUT = 30.0


def start(chain: Chain, **signer_options) -> str:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer(**signer_options)
    chain.start_agent()
    return public_line


def signer_public_key(chain: Chain) -> bytes:
    """Return the Noise public key of the chain's signer, from the key file 'tpmsigner id' reads."""
    return channel.StaticKey.load_or_create(chain.signer_home / NOISE_KEY_FILE).public


def agent_device_key(chain: Chain) -> channel.StaticKey:
    """The agent's own Noise key, which chain.pair() allowed on the signer as 'test-laptop'."""
    return AgentHome(chain.agent_home).static_key()


async def open_device_channel(
    chain: Chain, device_key: channel.StaticKey, source: str = LOCALHOST
) -> channel.NoiseChannel:
    """Connect to the chain's signer from ``source`` and finish the Noise handshake as ``device_key``."""
    reader, writer = await asyncio.open_connection(LOCALHOST, chain.signer_port, local_addr=(source, 0))
    return await channel.initiate(reader, writer, device_key, signer_public_key(chain))


async def exchange(secure: channel.NoiseChannel, request) -> object:
    await secure.send(encode_message(request))
    return decode_message(await asyncio.wait_for(secure.receive(), REPLY_TIMEOUT))


async def open_silent_connection(chain: Chain, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a TCP connection to the signer from ``source`` that sends nothing, so its handshake stays in progress."""
    return await asyncio.open_connection(LOCALHOST, chain.signer_port, local_addr=(source, 0))


@contextlib.asynccontextmanager
async def closing_all(writers: list[asyncio.StreamWriter]) -> AsyncIterator[list[asyncio.StreamWriter]]:
    try:
        yield writers
    finally:
        for writer in writers:
            writer.close()


def wait_for_log(managed, text: str, timeout: float = 10.0) -> None:
    wait_until(lambda: text in managed.log_text(), timeout, f"{managed.name} to log {text!r}")


# ---- the agent socket -----------------------------------------------------


def test_oversized_agent_message_fails_and_closes(chain: Chain) -> None:
    start(chain)

    async def run() -> None:
        bystander = await AsyncAgentConnection.open(chain.agent_socket)
        oversized = await AsyncAgentConnection.open(chain.agent_socket)
        try:
            oversized.writer.write(struct.pack(">I", wire.MAX_MESSAGE_LENGTH + 1) + b"\x0b" * 1024)
            reply = await oversized.read_reply()
            assert reply.message_type == SSH_AGENT_FAILURE
            assert await oversized.is_closed_by_peer()
            assert len(await bystander.list_identities()) == 1
        finally:
            await oversized.close()
            await bystander.close()

    asyncio.run(run())
    assert chain.agent is not None
    assert f"client sent a message length of {wire.MAX_MESSAGE_LENGTH + 1} bytes" in chain.agent.log_text()


def test_largest_agent_sign_request_is_signed(chain: Chain) -> None:
    public_line = start(chain)
    key_blob = key_blob_of(public_line)
    # type byte, the two string lengths and the flags take 13 bytes.
    data = bytes(range(256)) * 1024
    data = data[: wire.MAX_MESSAGE_LENGTH - 13 - len(key_blob)]

    async def sign() -> bytes:
        connection = await AsyncAgentConnection.open(chain.agent_socket)
        try:
            return signature_of_response(await connection.sign(key_blob, data))
        finally:
            await connection.close()

    signature = asyncio.run(sign())

    # The signer protocol message needs five Noise messages.
    assert len(encode_message(SignRequest(1, key_blob, data))) > 4 * channel.FRAGMENT_SIZE
    assert ecdsa_signature_verifies(public_line, data, signature)
    assert len(chain.approver_requests()) == 1


def test_agent_closes_connections_beyond_maximum(chain: Chain) -> None:
    start(chain)
    limit = agent_server.MAX_CLIENT_CONNECTIONS

    async def run() -> None:
        connections = [await AsyncAgentConnection.open(chain.agent_socket) for _ in range(limit)]
        try:
            # A listing on the last one proves the agent accepted them all.
            assert len(await connections[-1].list_identities()) == 1
            one_too_many = await AsyncAgentConnection.open(chain.agent_socket)
            try:
                assert await one_too_many.is_closed_by_peer()
            finally:
                await one_too_many.close()

            for connection in connections[:: limit // 8]:
                assert len(await connection.list_identities()) == 1

            # A freed place is given to the next client.
            await connections.pop().close()

            async def listing_on_new_connection() -> int:
                while True:
                    fresh = await AsyncAgentConnection.open(chain.agent_socket)
                    try:
                        return len(await fresh.list_identities())
                    except (asyncio.IncompleteReadError, ConnectionError):
                        await asyncio.sleep(0.05)
                    finally:
                        await fresh.close()

            assert await asyncio.wait_for(listing_on_new_connection(), 10) == 1
        finally:
            for connection in connections:
                await connection.close()

    asyncio.run(run())
    assert chain.agent is not None
    assert f"{limit} client connections are open, the maximum; closing the new one from pid" in chain.agent.log_text()


def test_agent_queues_signs_beyond_signer_limit(chain: Chain) -> None:
    public_line = start(chain, approval_timeout=60)
    key_blob = key_blob_of(public_line)
    clients = signer_client.MAX_SIGNS_IN_FLIGHT + 4
    chain.hold_approvals()

    async def sign(number: int) -> tuple[bytes, bytes]:
        connection = await AsyncAgentConnection.open(chain.agent_socket)
        data = f"queued {number}".encode()
        try:
            return data, signature_of_response(await connection.sign(key_blob, data, timeout=90))
        finally:
            await connection.close()

    async def run() -> list[tuple[bytes, bytes]]:
        signing = asyncio.gather(*(sign(number) for number in range(clients)))
        await asyncio.to_thread(
            wait_until, lambda: len(chain.approver_requests()) == signer_client.MAX_SIGNS_IN_FLIGHT, 30, "16 approvals"
        )
        # The rest wait in the agent, not at the signer.
        await asyncio.sleep(1.0)
        assert len(chain.approver_requests()) == signer_client.MAX_SIGNS_IN_FLIGHT
        chain.release_approvals()
        return await signing

    results = asyncio.run(run())

    assert len(results) == clients
    for data, signature in results:
        assert ecdsa_signature_verifies(public_line, data, signature)
    assert len(chain.approver_requests()) == clients
    assert chain.signer is not None
    assert "rejecting request id" not in chain.signer.log_text()


def test_agent_and_signer_pending_limits_match() -> None:
    assert signer_client.MAX_SIGNS_IN_FLIGHT == signer_server.MAX_PENDING_PER_CONNECTION


# ---- identities per listing -------------------------------------------------


def test_signer_listing_stops_at_maximum(chain: Chain, swtpm) -> None:
    chain.keygen("key-00000", PIN)
    store = tpmsigner.KeyStore(chain.signer_home)
    blob = store.key_blob(store.get("key-00000"))
    # The same TPM key under more labels than a listing may hold: the
    # signer lists labels, so one key is enough to reach the limit.
    for number in range(1, signer_server.MAX_LISTED_IDENTITIES + 1):
        store.add(f"key-{number:05d}", blob)
    chain.pair()
    chain.start_signer()

    async def list_once() -> object:
        secure = await open_device_channel(chain, agent_device_key(chain))
        try:
            return await exchange(secure, ListRequest(1))
        finally:
            await secure.close()

    reply = asyncio.run(list_once())

    assert isinstance(reply, ListReply)
    labels = [identity.label for identity in reply.identities]
    assert labels == [f"key-{number:05d}" for number in range(signer_server.MAX_LISTED_IDENTITIES)]
    assert chain.signer is not None
    assert (
        f"the key store has {signer_server.MAX_LISTED_IDENTITIES + 1} enabled identities; "
        f"listings show only the first {signer_server.MAX_LISTED_IDENTITIES} by label"
    ) in chain.signer.log_text()
    assert len(chain.tpmsigner("list").stdout.splitlines()) == signer_server.MAX_LISTED_IDENTITIES + 1


@pytest.fixture
def second_chain(tmp_path: Path, short_tmp_path: Path) -> Iterator[Chain]:
    """Homes and a signer launcher on a second swtpm, for an agent that pins two signers."""
    emulator = start_swtpm(tmp_path / "swtpm-second")
    second = Chain(workdir=tmp_path / "second", socket_dir=short_tmp_path, tcti=emulator.tcti)
    yield second

    leaked = second.stop()
    emulator.stop()
    if leaked or emulator.leaked_pids():
        pytest.fail(f"the second chain left {leaked or emulator.leaked_pids()} running")


def _create_identities(tcti: str, home: Path, prefix: str, count: int) -> list[tpmsigner.Identity]:
    store = tpmsigner.KeyStore(home)
    with Tpm(tcti) as tpm:
        # Labels of the maximum length, 64 characters, make each entry of
        # the listing as large as a P-256 key allows.
        return [
            tpmsigner.create_identity(tpm, store, f"{prefix}-{number:04d}".ljust(64, "x"), PIN.encode())
            for number in range(count)
        ]


def _answer_size(identities: list[tpmsigner.Identity]) -> int:
    return len(wire.encode_identities_answer([(identity.public_key_blob, identity.label) for identity in identities]))


def test_agent_rejects_listing_over_client_limit(chain: Chain, swtpm, second_chain: Chain) -> None:
    # No signer lists more than MAX_LISTED_IDENTITIES, and a listing of that
    # many P-256 keys fits in an agent message, so two signers are needed.
    per_signer = 750
    first = _create_identities(swtpm.tcti, chain.signer_home, "first", per_signer)
    second = _create_identities(second_chain.tcti, second_chain.signer_home, "second", per_signer)
    assert _answer_size(first + second) > wire.MAX_MESSAGE_LENGTH
    chain.pair()
    second_chain.tpmsigner("allow", "test-laptop", chain.tpmsigner_agent("id").stdout.strip())
    second_key = second_chain.tpmsigner("id").stdout.strip()
    chain.tpmsigner_agent("trust", "second-signer", f"{LOCALHOST}:{second_chain.signer_port}", second_key)
    chain.start_signer()
    second_chain.start_signer()
    chain.start_agent()

    too_many = chain.ssh_add("-L")

    assert too_many.returncode != 0
    assert chain.agent is not None
    assert (
        f"the signers list {2 * per_signer} identities in {_answer_size(first + second)} bytes, over the "
        f"{wire.MAX_IDENTITIES} identities or {wire.MAX_MESSAGE_LENGTH} bytes that ssh-agent clients accept"
    ) in chain.agent.log_text()

    # Disabling enough identities on one signer brings the listing back.
    store = tpmsigner.KeyStore(second_chain.signer_home)
    kept = list(second)
    while _answer_size(first + kept) > wire.MAX_MESSAGE_LENGTH:
        store.set_enabled(kept.pop().label, False)
    listed = chain.ssh_add("-L")

    assert listed.returncode == 0, listed.stderr
    assert sorted(listed.stdout.splitlines()) == sorted(identity.openssh_line() for identity in first + kept)


# ---- signer messages --------------------------------------------------------


def test_signer_closes_channel_on_oversized_message(chain: Chain) -> None:
    start(chain)
    device_key = agent_device_key(chain)

    async def run() -> object:
        secure = await open_device_channel(chain, device_key)
        try:
            # NoiseChannel.send refuses to build such a message, so the
            # fragments are encrypted and framed here, all marked "more".
            for _ in range(channel.MAX_PAYLOAD // channel.FRAGMENT_SIZE + 1):
                fragment = bytes([channel.FRAGMENT_MORE]) + bytes(channel.FRAGMENT_SIZE)
                await channel._write_frame(secure._writer, secure._connection.encrypt(fragment))
            with pytest.raises(ChannelError, match="closed"):
                await asyncio.wait_for(secure.receive(), REPLY_TIMEOUT)
        finally:
            await secure.close()

        fresh = await open_device_channel(chain, device_key)
        try:
            return await exchange(fresh, ListRequest(2))
        finally:
            await fresh.close()

    reply = asyncio.run(run())

    assert isinstance(reply, ListReply)
    assert chain.signer is not None
    assert f"a message exceeds the maximum of {channel.MAX_PAYLOAD} bytes; closing the channel" in chain.signer.log_text()


def test_agent_rejects_request_over_signer_maximum(chain: Chain) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    # A sign request within the agent message limit always fits in a signer
    # message, so the agent's own signer client is driven directly here.
    pinned = PinnedSigner("test-signer", LOCALHOST, chain.signer_port, signer_public_key(chain))
    client = signer_client.SignerClient(pinned, agent_device_key(chain))

    async def run() -> list[tuple[bytes, str]]:
        try:
            with pytest.raises(SignerError, match=f"over the signer protocol's limit of {channel.MAX_PAYLOAD} bytes"):
                await client.sign(key_blob_of(public_line), bytes(channel.MAX_PAYLOAD), 0, ProcessInfo())
            return await client.list_identities()
        finally:
            await client.close()

    listed = asyncio.run(run())

    assert [label for _, label in listed] == ["work"]
    assert chain.approver_requests() == []


# ---- connections to the signer ---------------------------------------------


def test_signer_limits_connections_per_device(chain: Chain) -> None:
    chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    device_key = agent_device_key(chain)
    limit = signer_server.MAX_CONNECTIONS_PER_DEVICE

    async def run() -> None:
        open_channels = []
        try:
            for number in range(limit):
                secure = await open_device_channel(chain, device_key)
                open_channels.append(secure)
                assert isinstance(await exchange(secure, ListRequest(number)), ListReply)

            one_too_many = await open_device_channel(chain, device_key)
            try:
                rejection = decode_message(await asyncio.wait_for(one_too_many.receive(), REPLY_TIMEOUT))
                assert rejection == Failure(
                    CONNECTION_REQUEST_ID,
                    FailureCode.BUSY,
                    f"device 'test-laptop' already has {limit} connections to this signer",
                )
                with pytest.raises(ChannelError):
                    await asyncio.wait_for(one_too_many.receive(), REPLY_TIMEOUT)
            finally:
                await one_too_many.close()

            # The agent, as a ninth connection of the same device, reports why.
            chain.start_agent()
            assert (await asyncio.to_thread(chain.ssh_add, "-l")).returncode != 0
            assert chain.agent is not None
            wait_for_log(chain.agent, "the signer rejected the connection: device 'test-laptop' already has 8")

            # Once one connection closes, the agent gets its place.
            await open_channels.pop().close()
            await asyncio.to_thread(wait_for_log, chain.signer, "disconnected")
            listed = await asyncio.to_thread(chain.ssh_add, "-l")
            assert listed.returncode == 0, listed.stderr
        finally:
            for secure in open_channels:
                await secure.close()

    asyncio.run(run())
    assert chain.signer is not None
    assert f"device 'test-laptop' already has {limit} connections; closing the new one" in chain.signer.log_text()


def test_signer_limits_pending_handshakes_per_address(chain: Chain) -> None:
    chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    limit = admission.MAX_HANDSHAKES_PER_ADDRESS

    async def run() -> object:
        silent = [(await open_silent_connection(chain, "127.0.0.2"))[1] for _ in range(limit)]
        async with closing_all(silent):
            reader, writer = await open_silent_connection(chain, "127.0.0.2")
            async with closing_all([writer]):
                assert await asyncio.wait_for(reader.read(1), REPLY_TIMEOUT) == b""

            # Another address is not held back.
            secure = await open_device_channel(chain, agent_device_key(chain), source="127.0.0.3")
            try:
                return await exchange(secure, ListRequest(1))
            finally:
                await secure.close()

    reply = asyncio.run(run())

    assert isinstance(reply, ListReply)
    assert chain.signer is not None
    assert (
        f"closed before the handshake: {limit} handshakes from 127.0.0.2 are already in progress"
        in chain.signer.log_text()
    )


def test_signer_limits_pending_handshakes_overall(chain: Chain) -> None:
    chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    per_address = admission.MAX_HANDSHAKES_PER_ADDRESS
    sources = [f"127.0.1.{number}" for number in range(1, admission.MAX_HANDSHAKES // per_address + 1)]

    rejected_port = 0

    async def run() -> object:
        nonlocal rejected_port
        silent = [(await open_silent_connection(chain, source))[1] for source in sources for _ in range(per_address)]
        async with closing_all(silent):
            assert len(silent) == admission.MAX_HANDSHAKES
            reader, writer = await open_silent_connection(chain, "127.0.2.1")
            rejected_port = writer.get_extra_info("sockname")[1]
            async with closing_all([writer]):
                assert await asyncio.wait_for(reader.read(1), REPLY_TIMEOUT) == b""

        # With the silent connections gone, handshakes are admitted again.
        async def list_when_admitted() -> object:
            while True:
                try:
                    secure = await open_device_channel(chain, agent_device_key(chain), source="127.0.2.2")
                except ChannelError:
                    await asyncio.sleep(0.2)
                    continue
                try:
                    return await exchange(secure, ListRequest(1))
                finally:
                    await secure.close()

        return await asyncio.wait_for(list_when_admitted(), REPLY_TIMEOUT)

    reply = asyncio.run(run())

    assert isinstance(reply, ListReply)
    assert chain.signer is not None
    assert (
        f"connection from 127.0.2.1:{rejected_port} closed before the handshake: "
        f"{admission.MAX_HANDSHAKES} handshakes are already in progress"
    ) in chain.signer.log_text()


def test_signer_limits_handshake_attempts_per_address(chain: Chain) -> None:
    chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()

    async def attempt_and_give_up(source: str) -> None:
        """Connect, send nothing, and wait until the signer has closed its side."""
        reader, writer = await asyncio.open_connection(LOCALHOST, chain.signer_port, local_addr=(source, 0))
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(1), REPLY_TIMEOUT) == b""
        writer.close()

    async def run() -> object:
        for _ in range(admission.MAX_HANDSHAKE_ATTEMPTS):
            await attempt_and_give_up("127.0.0.4")
        with pytest.raises(ChannelError):
            await open_device_channel(chain, agent_device_key(chain), source="127.0.0.4")

        secure = await open_device_channel(chain, agent_device_key(chain), source="127.0.0.5")
        try:
            return await exchange(secure, ListRequest(1))
        finally:
            await secure.close()

    reply = asyncio.run(run())

    assert isinstance(reply, ListReply)
    assert chain.signer is not None
    assert (
        f"closed before the handshake: more than {admission.MAX_HANDSHAKE_ATTEMPTS} handshake attempts "
        f"from 127.0.0.4 in {admission.HANDSHAKE_WINDOW:g} s"
    ) in chain.signer.log_text()


class FakeClock:
    """A monotonic clock that advances only when a test sets ``now``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_handshake_attempts_admitted_after_window() -> None:
    clock = FakeClock()
    limiter = admission.HandshakeAdmission(clock=clock)
    for _ in range(admission.MAX_HANDSHAKE_ATTEMPTS):
        assert limiter.admit("192.0.2.1") is None
        limiter.finish("192.0.2.1")
        clock.now += 1.0

    assert limiter.admit("192.0.2.1") is not None
    clock.now += admission.HANDSHAKE_WINDOW - admission.MAX_HANDSHAKE_ATTEMPTS + 1.0
    assert limiter.admit("192.0.2.1") is None
    assert limiter.in_progress == 1


def test_ipv6_addresses_of_one_64_share_limits() -> None:
    limiter = admission.HandshakeAdmission(clock=FakeClock())
    for number in range(admission.MAX_HANDSHAKES_PER_ADDRESS):
        assert limiter.admit(f"2001:db8:0:1::{number + 1:x}") is None

    rejection = limiter.admit("2001:db8:0:1:ffff::9")
    assert rejection is not None
    assert "2001:db8:0:1::/64" in rejection
    # Another /64, and an IPv4 peer, still get their own share.
    assert limiter.admit("2001:db8:0:2::1") is None
    assert limiter.admit("192.0.2.7") is None
    limiter.finish("2001:db8:0:1::1")
    assert limiter.admit("2001:db8:0:1::abcd") is None


@pytest.mark.parametrize(
    ("address", "source"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("fe80::1%eth0", "fe80::/64%eth0"),
        ("fe80::1%eth1", "fe80::/64%eth1"),
        ("::1", "::/64"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_source_of_address(address: str, source: str) -> None:
    assert admission.source_of(address) == source


def test_admission_forgets_least_recent_addresses() -> None:
    limiter = admission.HandshakeAdmission(clock=FakeClock())
    for number in range(admission.MAX_TRACKED_ADDRESSES + 10):
        address = f"10.{number // 65536}.{number // 256 % 256}.{number % 256}"
        assert limiter.admit(address) is None
        limiter.finish(address)

    assert len(limiter._attempts) == admission.MAX_TRACKED_ADDRESSES
    assert "10.0.0.0" not in limiter._attempts
    assert limiter.in_progress == 0
    assert limiter._in_progress == {}


# ---- sign requests waiting at the signer ------------------------------------


def test_signer_rejects_burst_beyond_pending_limit(chain: Chain) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer(approval_timeout=60)
    chain.hold_approvals()
    key_blob = key_blob_of(public_line)
    limit = signer_server.MAX_PENDING_PER_CONNECTION
    burst = limit + 4

    async def run() -> list[object]:
        secure = await open_device_channel(chain, agent_device_key(chain))
        try:
            # One write, so the signer reads the whole burst before any
            # request's task has started.
            frames = b""
            for request_id in range(1, burst + 1):
                plaintext = bytes([channel.FRAGMENT_LAST]) + encode_message(
                    SignRequest(request_id, key_blob, f"burst {request_id}".encode())
                )
                ciphertext = secure._connection.encrypt(plaintext)
                frames += struct.pack(">H", len(ciphertext)) + ciphertext
            secure._writer.write(frames)
            await secure._writer.drain()

            replies = [decode_message(await asyncio.wait_for(secure.receive(), REPLY_TIMEOUT)) for _ in range(burst - limit)]
            await asyncio.to_thread(wait_until, lambda: len(chain.approver_requests()) == limit, 30, "16 approvals")
            chain.release_approvals()
            replies += [decode_message(await asyncio.wait_for(secure.receive(), 60)) for _ in range(limit)]
            return replies
        finally:
            await secure.close()

    replies = asyncio.run(run())

    busy = [reply for reply in replies if isinstance(reply, Failure)]
    signed = [reply for reply in replies if isinstance(reply, SignReply)]
    assert len(busy) == burst - limit
    assert {reply.code for reply in busy} == {FailureCode.BUSY}
    assert len(signed) == limit
    assert sorted(reply.request_id for reply in replies) == list(range(1, burst + 1))
    for reply in signed:
        assert ecdsa_signature_verifies(public_line, f"burst {reply.request_id}".encode(), reply.signature)


def test_signer_rejects_signs_beyond_waiting_approvals(chain: Chain) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer(approval_timeout=90)
    chain.hold_approvals()
    key_blob = key_blob_of(public_line)
    per_connection = signer_server.MAX_PENDING_PER_CONNECTION
    limit = signer_server.MAX_WAITING_APPROVALS
    connections = limit // per_connection

    async def run() -> tuple[object, list[object], object]:
        device_key = agent_device_key(chain)
        channels = [await open_device_channel(chain, device_key) for _ in range(connections + 1)]
        try:
            for index, secure in enumerate(channels[:connections]):
                for number in range(per_connection):
                    request_id = index * per_connection + number + 1
                    await secure.send(encode_message(SignRequest(request_id, key_blob, f"wait {request_id}".encode())))
            await asyncio.to_thread(wait_until, lambda: len(chain.approver_requests()) == limit, 60, "32 approvals")

            extra = channels[connections]
            rejected = await exchange(extra, SignRequest(1000, key_blob, b"one too many"))

            chain.release_approvals()
            waited = [
                decode_message(await asyncio.wait_for(secure.receive(), 90))
                for secure in channels[:connections]
                for _ in range(per_connection)
            ]
            after = await exchange(extra, SignRequest(1001, key_blob, b"after the queue emptied"))
            return rejected, waited, after
        finally:
            for secure in channels:
                await secure.close()

    rejected, waited, after = asyncio.run(run())

    assert rejected == Failure(
        1000, FailureCode.BUSY, f"{limit} sign requests are already waiting for approval on the signer"
    )
    assert all(isinstance(reply, SignReply) for reply in waited)
    assert sorted(reply.request_id for reply in waited) == list(range(1, limit + 1))
    assert isinstance(after, SignReply)
    assert ecdsa_signature_verifies(public_line, b"after the queue emptied", after.signature)
    assert chain.signer is not None
    assert f"{limit} sign requests are already waiting for approval; rejected as busy" in chain.signer.log_text()
    assert len(chain.approver_requests()) == limit + 1
