"""Tests of the Noise_XX channel between agent and signer, over TCP on 127.0.0.1.

pytest-asyncio is not installed, so each test runs its coroutine with
asyncio.run. Every server and stream a test opens is closed before
asyncio.run returns.
"""

import asyncio
import base64
import contextlib
import stat
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.support import LOCALHOST
from tpmsigner.errors import ChannelClosedError, ChannelError, ConfigError, PeerNotTrustedError
from tpmsigner.protocol.channel import (
    FRAGMENT_SIZE,
    MAX_PAYLOAD,
    PUBLIC_KEY_PREFIX,
    NoiseChannel,
    StaticKey,
    format_public_key,
    initiate,
    parse_public_key,
    respond,
)

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]

ACCEPT_TIMEOUT_SECONDS = 5.0
SHORT_HANDSHAKE_TIMEOUT = 0.5


@contextlib.asynccontextmanager
async def tcp_streams() -> AsyncIterator[tuple[Streams, Streams]]:
    """Yield the client and server streams of one TCP connection on 127.0.0.1."""
    accepted: asyncio.Queue[Streams] = asyncio.Queue()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put((reader, writer))

    server = await asyncio.start_server(on_connect, LOCALHOST, 0)
    writers: list[asyncio.StreamWriter] = []
    try:
        port = server.sockets[0].getsockname()[1]
        client = await asyncio.open_connection(LOCALHOST, port)
        writers.append(client[1])
        served = await asyncio.wait_for(accepted.get(), ACCEPT_TIMEOUT_SECONDS)
        writers.append(served[1])
        yield client, served
    finally:
        for writer in writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        server.close()
        await server.wait_closed()


async def handshake(
    client: Streams, served: Streams, agent_key: StaticKey, signer_key: StaticKey
) -> tuple[NoiseChannel, NoiseChannel]:
    return await asyncio.gather(
        initiate(*client, agent_key, signer_key.public),
        respond(*served, signer_key, lambda remote: remote == agent_key.public),
    )


async def read_raw_frame(reader: asyncio.StreamReader) -> bytes:
    """Read one length-prefixed frame without decrypting it, header included."""
    header = await reader.readexactly(2)
    (length,) = struct.unpack(">H", header)
    return header + await reader.readexactly(length)


def test_handshake_authenticates_both_sides() -> None:
    agent_key, signer_key = StaticKey.generate(), StaticKey.generate()

    async def run() -> None:
        async with tcp_streams() as (client, served):
            agent, signer = await handshake(client, served, agent_key, signer_key)

            assert agent.remote_static == signer_key.public
            assert signer.remote_static == agent_key.public
            assert agent.handshake_hash == signer.handshake_hash
            assert len(agent.handshake_hash) == 32

    asyncio.run(run())


def test_messages_flow_both_ways() -> None:
    agent_key, signer_key = StaticKey.generate(), StaticKey.generate()

    async def run() -> None:
        async with tcp_streams() as (client, served):
            agent, signer = await handshake(client, served, agent_key, signer_key)

            await agent.send(b"request one")
            await agent.send(b"")
            await signer.send(b"reply one")
            assert await signer.receive() == b"request one"
            assert await signer.receive() == b""
            assert await agent.receive() == b"reply one"

    asyncio.run(run())


def test_max_payload_round_trip() -> None:
    agent_key, signer_key = StaticKey.generate(), StaticKey.generate()
    payload = bytes(range(256)) * (MAX_PAYLOAD // 256) + b"\xaa" * (MAX_PAYLOAD % 256)

    async def run() -> None:
        async with tcp_streams() as (client, served):
            agent, signer = await handshake(client, served, agent_key, signer_key)

            await agent.send(payload)
            assert await signer.receive() == payload

    asyncio.run(run())


def test_send_over_max_payload_raises() -> None:
    agent_key, signer_key = StaticKey.generate(), StaticKey.generate()

    async def run() -> None:
        async with tcp_streams() as (client, served):
            agent, _ = await handshake(client, served, agent_key, signer_key)

            with pytest.raises(ValueError, match=str(MAX_PAYLOAD)):
                await agent.send(bytes(MAX_PAYLOAD + 1))

    asyncio.run(run())


def test_initiator_rejects_wrong_signer_key() -> None:
    agent_key, signer_key, pinned_key = StaticKey.generate(), StaticKey.generate(), StaticKey.generate()
    trust_checks: list[bytes] = []

    def is_trusted(remote: bytes) -> bool:
        trust_checks.append(remote)
        return True

    async def run() -> None:
        async with tcp_streams() as (client, served):
            responder = asyncio.create_task(respond(*served, signer_key, is_trusted))

            with pytest.raises(PeerNotTrustedError, match="pin the new one"):
                await initiate(*client, agent_key, pinned_key.public)
            # The agent closes the connection without sending message 3, the
            # one that carries its static key.
            client[1].close()

            with pytest.raises(ChannelError, match="the peer closed the connection"):
                await responder
            assert trust_checks == []

    asyncio.run(run())


def test_responder_rejects_untrusted_agent() -> None:
    agent_key, signer_key = StaticKey.generate(), StaticKey.generate()
    trust_checks: list[bytes] = []

    def is_trusted(remote: bytes) -> bool:
        trust_checks.append(remote)
        return False

    async def run() -> None:
        async with tcp_streams() as (client, served):
            initiator = asyncio.create_task(initiate(*client, agent_key, signer_key.public))

            with pytest.raises(PeerNotTrustedError, match="is not allowed"):
                await respond(*served, signer_key, is_trusted)
            served[1].close()

            # The agent finished its side, and learns of the rejection when
            # the signer closes the connection.
            agent = await initiator
            with pytest.raises(ChannelError, match="the peer closed the connection"):
                await agent.receive()
            assert trust_checks == [agent_key.public]

    asyncio.run(run())


def test_flipped_ciphertext_bit_raises() -> None:
    agent_key, signer_key = StaticKey.generate(), StaticKey.generate()

    async def run() -> None:
        async with tcp_streams() as (client, served):
            agent, signer = await handshake(client, served, agent_key, signer_key)
            await agent.send(b"sign this")
            frame = bytearray(await read_raw_frame(served[0]))
            frame[2] ^= 0x01

            # The tampered frame goes back through the client's socket, so the
            # signer reads it in place of the original.
            client[1].write(bytes(frame))
            await client[1].drain()

            with pytest.raises(ChannelError, match="failed authentication"):
                await signer.receive()

    asyncio.run(run())


def test_replayed_frame_raises() -> None:
    agent_key, signer_key = StaticKey.generate(), StaticKey.generate()

    async def run() -> None:
        async with tcp_streams() as (client, served):
            agent, signer = await handshake(client, served, agent_key, signer_key)
            await agent.send(b"sign this")
            frame = await read_raw_frame(served[0])

            client[1].write(frame + frame)
            await client[1].drain()

            assert await signer.receive() == b"sign this"
            with pytest.raises(ChannelError, match="failed authentication"):
                await signer.receive()

    asyncio.run(run())


@pytest.mark.parametrize("frame", [b"\x00\x00", b"\x00\x05short", b"\x00\x10" + bytes(16)], ids=["empty", "5", "16"])
def test_short_or_forged_frame_raises(frame: bytes) -> None:
    agent_key, signer_key = StaticKey.generate(), StaticKey.generate()

    async def run() -> None:
        async with tcp_streams() as (client, served):
            _, signer = await handshake(client, served, agent_key, signer_key)

            client[1].write(frame)
            await client[1].drain()

            with pytest.raises(ChannelError, match="failed authentication"):
                await signer.receive()

    asyncio.run(run())


def test_truncated_frame_then_eof_raises() -> None:
    agent_key, signer_key = StaticKey.generate(), StaticKey.generate()

    async def run() -> None:
        async with tcp_streams() as (client, served):
            _, signer = await handshake(client, served, agent_key, signer_key)

            client[1].write(b"\x01\x00" + bytes(10))
            client[1].write_eof()

            with pytest.raises(ChannelError, match="the peer closed the connection"):
                await signer.receive()

    asyncio.run(run())


def test_close_between_messages_is_clean() -> None:
    agent_key, signer_key = StaticKey.generate(), StaticKey.generate()

    async def run() -> None:
        async with tcp_streams() as (client, served):
            agent, signer = await handshake(client, served, agent_key, signer_key)
            await agent.send(b"list")
            assert await signer.receive() == b"list"

            await agent.close()

            with pytest.raises(ChannelClosedError, match="the peer closed the connection"):
                await signer.receive()

    asyncio.run(run())


@pytest.mark.parametrize("kept", [1, 12], ids=["inside-header", "inside-frame"])
def test_close_inside_frame_is_not_clean(kept: int) -> None:
    agent_key, signer_key = StaticKey.generate(), StaticKey.generate()

    async def run() -> None:
        async with tcp_streams() as (client, served):
            agent, signer = await handshake(client, served, agent_key, signer_key)
            await agent.send(b"sign this")
            frame = await read_raw_frame(served[0])

            client[1].write(frame[:kept])
            client[1].write_eof()

            with pytest.raises(ChannelError, match="in the middle of a frame") as raised:
                await signer.receive()
            assert not isinstance(raised.value, ChannelClosedError)

    asyncio.run(run())


def test_close_between_fragments_is_not_clean() -> None:
    agent_key, signer_key = StaticKey.generate(), StaticKey.generate()

    async def run() -> None:
        async with tcp_streams() as (client, served):
            agent, signer = await handshake(client, served, agent_key, signer_key)
            await agent.send(bytes(FRAGMENT_SIZE + 1))
            first_fragment = await read_raw_frame(served[0])
            await read_raw_frame(served[0])

            # Only the first of the two fragments reaches the signer.
            client[1].write(first_fragment)
            client[1].write_eof()

            with pytest.raises(ChannelError, match="in the middle of a message") as raised:
                await signer.receive()
            assert not isinstance(raised.value, ChannelClosedError)

    asyncio.run(run())


def test_silent_initiator_times_out() -> None:
    signer_key = StaticKey.generate()

    async def run() -> None:
        async with tcp_streams() as (_, served):
            started = time.monotonic()

            with pytest.raises(ChannelError, match="did not finish within 0.5 s"):
                await respond(*served, signer_key, lambda remote: True, timeout=SHORT_HANDSHAKE_TIMEOUT)
            assert time.monotonic() - started < 5

    asyncio.run(run())


def test_silent_responder_times_out() -> None:
    agent_key, signer_key = StaticKey.generate(), StaticKey.generate()

    async def run() -> None:
        async with tcp_streams() as (client, _):
            started = time.monotonic()

            with pytest.raises(ChannelError, match="did not finish within 0.5 s"):
                await initiate(*client, agent_key, signer_key.public, timeout=SHORT_HANDSHAKE_TIMEOUT)
            assert time.monotonic() - started < 5

    asyncio.run(run())


@pytest.mark.parametrize(
    "message_one", [b"", b"\x01" * 5, bytes(32)], ids=["empty", "short", "zero key"]
)
def test_garbage_handshake_message_raises(message_one: bytes) -> None:
    signer_key = StaticKey.generate()

    async def run() -> None:
        async with tcp_streams() as (client, served):
            client[1].write(struct.pack(">H", len(message_one)) + message_one)
            await client[1].drain()

            with pytest.raises(ChannelError, match="invalid Noise handshake message"):
                await respond(*served, signer_key, lambda remote: True, timeout=SHORT_HANDSHAKE_TIMEOUT)

    asyncio.run(run())


def test_load_or_create_writes_private_file(tmp_path: Path) -> None:
    path = tmp_path / "noise.key"

    created = StaticKey.load_or_create(path)
    loaded = StaticKey.load_or_create(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert loaded == created
    assert len(created.private) == 32
    derived = X25519PrivateKey.from_private_bytes(created.private).public_key()
    assert derived.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == created.public


def test_load_or_create_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "noise.key"
    path.write_bytes(b"not a PEM file\n")

    with pytest.raises(ConfigError, match="cannot read the Noise static key"):
        StaticKey.load_or_create(path)


def test_load_or_create_rejects_ed25519(tmp_path: Path) -> None:
    path = tmp_path / "noise.key"
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)

    with pytest.raises(ConfigError, match="does not hold an X25519 private key"):
        StaticKey.load_or_create(path)


def test_public_key_text_round_trip() -> None:
    key = StaticKey.generate()

    text = format_public_key(key.public)

    assert text == PUBLIC_KEY_PREFIX + base64.b64encode(key.public).decode("ascii")
    assert parse_public_key(text) == key.public
    assert parse_public_key(f"  {text}\n") == key.public


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ssh-ed25519 AAAA", "must start with 'tpmsigner-noise-x25519:'"),
        ("", "must start with"),
        (PUBLIC_KEY_PREFIX + "not base64!", "not base64"),
        (PUBLIC_KEY_PREFIX + "QUJ", "not base64"),
        (PUBLIC_KEY_PREFIX + base64.b64encode(bytes(31)).decode("ascii"), "31 bytes instead of 32"),
        (PUBLIC_KEY_PREFIX + base64.b64encode(bytes(33)).decode("ascii"), "33 bytes instead of 32"),
        (PUBLIC_KEY_PREFIX, "0 bytes instead of 32"),
    ],
    ids=["other prefix", "empty", "bad characters", "missing padding", "31 bytes", "33 bytes", "prefix only"],
)
def test_parse_public_key_rejects(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_public_key(text)


def test_fragmented_message_round_trip() -> None:
    from tpmsigner.protocol.channel import FRAGMENT_SIZE

    agent_key, signer_key = StaticKey.generate(), StaticKey.generate()
    payload = bytes(range(256)) * (3 * FRAGMENT_SIZE // 256 + 1)

    async def run() -> None:
        async with tcp_streams() as (client, served):
            agent, signer = await handshake(client, served, agent_key, signer_key)

            await agent.send(payload)
            await agent.send(b"next")
            assert await signer.receive() == payload
            assert await signer.receive() == b"next"

    asyncio.run(run())


def test_invalid_fragment_flag_closes_channel() -> None:
    from tpmsigner.protocol.channel import _write_frame

    agent_key, signer_key = StaticKey.generate(), StaticKey.generate()

    async def run() -> None:
        async with tcp_streams() as (client, served):
            agent, signer = await handshake(client, served, agent_key, signer_key)

            # An authenticated plaintext whose first byte is not a fragment flag.
            await _write_frame(client[1], agent._connection.encrypt(b"\x07payload"))
            with pytest.raises(ChannelError, match="invalid fragment header"):
                await signer.receive()

    asyncio.run(run())


def test_reassembly_stops_at_max_payload() -> None:
    from tpmsigner.protocol.channel import FRAGMENT_MORE, FRAGMENT_SIZE, _write_frame

    agent_key, signer_key = StaticKey.generate(), StaticKey.generate()

    async def run() -> None:
        async with tcp_streams() as (client, served):
            agent, signer = await handshake(client, served, agent_key, signer_key)

            async def flood() -> None:
                for _ in range(MAX_PAYLOAD // FRAGMENT_SIZE + 2):
                    fragment = bytes([FRAGMENT_MORE]) + bytes(FRAGMENT_SIZE)
                    await _write_frame(client[1], agent._connection.encrypt(fragment))

            sender = asyncio.create_task(flood())
            with pytest.raises(ChannelError, match="exceeds the maximum"):
                await signer.receive()
            sender.cancel()

    asyncio.run(run())
