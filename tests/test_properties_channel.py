"""Property tests of the Noise channel's framing, fragment reassembly and handshake,
and of the pairing messages that travel inside it.

The peer here is a raw noiseprotocol connection on the other end of a real
socket pair, so a test can send fragments, flags and frames that
NoiseChannel.send never produces.  receive() must return exactly what was
sent, or raise ChannelError; the handshake must finish or raise
ChannelError.  Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tests.support.mutations import bad_input, mutated, mutations_of, utf8_text
from tpmsigner import pairing
from tpmsigner.errors import ChannelError, ConfigError, ProtocolError
from tpmsigner.protocol import channel
from tpmsigner.signer.devices import DeviceRegistry
from tpmsigner_agent.config import AgentHome
from tpmsigner.protocol.channel import FRAGMENT_LAST, FRAGMENT_MORE, MAX_NOISE_MESSAGE, StaticKey

AGENT_KEY = StaticKey.generate()
SIGNER_KEY = StaticKey.generate()
RECEIVE_TIMEOUT = 10.0


def _raw_handshake():
    """Return (agent, signer) noiseprotocol connections after a complete XX handshake."""
    agent = channel._new_connection(AGENT_KEY, initiator=True)
    signer = channel._new_connection(SIGNER_KEY, initiator=False)
    signer.read_message(agent.write_message())
    agent.read_message(signer.write_message())
    signer.read_message(agent.write_message())
    return agent, signer


def _frame(ciphertext: bytes) -> bytes:
    return struct.pack(">H", len(ciphertext)) + ciphertext


async def _receive_all(signer, stream: bytes, count: int) -> list[bytes | ChannelError]:
    """Feed ``stream`` to a NoiseChannel over ``signer`` and call receive() up to ``count`` times.

    The outcomes are the messages received, then the ChannelError that
    ended the channel, if any.
    """
    left, right = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=left)
    try:
        secure = channel.NoiseChannel(signer, AGENT_KEY.public, reader, writer)
        right.sendall(stream)
        right.shutdown(socket.SHUT_WR)
        outcomes: list[bytes | ChannelError] = []
        for _ in range(count):
            try:
                outcomes.append(await asyncio.wait_for(secure.receive(), RECEIVE_TIMEOUT))
            except ChannelError as exc:
                outcomes.append(exc)
                break
        return outcomes
    finally:
        writer.close()
        right.close()


def receive_all(signer, stream: bytes, count: int) -> list[bytes | ChannelError]:
    return asyncio.run(_receive_all(signer, stream, count))


def encrypt_plaintexts(agent, plaintexts: list[bytes]) -> bytes:
    """Return the frames of ``plaintexts`` encrypted by the agent's side, in nonce order."""
    return b"".join(_frame(bytes(agent.encrypt(plaintext))) for plaintext in plaintexts)


def expected_outcomes(plaintexts: list[bytes], count: int) -> list[bytes | type[ChannelError]]:
    """Return what receive() must give for these decrypted plaintexts, by the framing rules in channel.py."""
    outcomes: list[bytes | type[ChannelError]] = []
    message = b""
    for plaintext in plaintexts:
        if not plaintext or plaintext[0] not in (FRAGMENT_MORE, FRAGMENT_LAST):
            return outcomes + [ChannelError]
        message += plaintext[1:]
        if len(message) > channel.MAX_PAYLOAD:
            return outcomes + [ChannelError]
        if plaintext[0] == FRAGMENT_LAST:
            outcomes.append(message)
            message = b""
            if len(outcomes) == count:
                return outcomes
    # The peer closed the connection.
    return outcomes + [ChannelError]


@st.composite
def fragmented_messages(draw: st.DrawFn) -> tuple[list[bytes], list[bytes]]:
    """Return (messages, plaintexts): each message cut into fragments with flag bytes."""
    messages = draw(st.lists(st.binary(max_size=300), min_size=1, max_size=4))
    plaintexts = []
    for message in messages:
        cuts = sorted(draw(st.lists(st.integers(0, len(message)), max_size=4)))
        pieces = [message[start:end] for start, end in zip([0, *cuts], [*cuts, len(message)])]
        plaintexts += [bytes([FRAGMENT_MORE]) + piece for piece in pieces[:-1]]
        plaintexts.append(bytes([FRAGMENT_LAST]) + pieces[-1])
    return messages, plaintexts


@given(fragmented_messages())
def test_fragments_reassemble_to_each_message(case: tuple[list[bytes], list[bytes]]) -> None:
    messages, plaintexts = case
    agent, signer = _raw_handshake()

    outcomes = receive_all(signer, encrypt_plaintexts(agent, plaintexts), len(messages))

    assert outcomes == messages


@given(
    st.one_of(
        fragmented_messages().map(lambda case: case[1]),
        fragmented_messages().flatmap(
            lambda case: st.lists(st.sampled_from(case[1]) | mutations_of(case[1][0]), min_size=1, max_size=6)
        ),
        st.lists(st.binary(max_size=40), max_size=5),
    )
)
def test_any_plaintexts_give_messages_or_channel_error(plaintexts: list[bytes]) -> None:
    agent, signer = _raw_handshake()

    outcomes = receive_all(signer, encrypt_plaintexts(agent, plaintexts), 8)

    expected = expected_outcomes(plaintexts, 8)
    assert len(outcomes) == len(expected)
    for outcome, wanted in zip(outcomes, expected):
        if wanted is ChannelError:
            assert isinstance(outcome, ChannelError)
            assert str(outcome)
        else:
            assert outcome == wanted


@given(fragmented_messages(), st.data())
def test_tampered_stream_never_yields_unsent_message(case: tuple[list[bytes], list[bytes]], data: st.DataObject) -> None:
    messages, plaintexts = case
    agent, signer = _raw_handshake()
    # The ciphertext is new for every handshake, so the mutation is drawn
    # after encryption; its offsets depend only on the stream's length.
    stream = data.draw(mutated(st.just(encrypt_plaintexts(agent, plaintexts))), label="tampered stream")

    outcomes = receive_all(signer, stream, len(messages))

    # Authenticated encryption: every message that comes out was sent, in
    # order, and the first tampered frame ends the channel.
    received = [outcome for outcome in outcomes if isinstance(outcome, bytes)]
    assert received == messages[: len(received)]
    assert len(received) == len(messages) or isinstance(outcomes[-1], ChannelError)


@given(st.binary(max_size=200) | st.binary(min_size=2, max_size=2).map(lambda header: header + b"x" * 10))
def test_raw_bytes_are_channel_errors(stream: bytes) -> None:
    _, signer = _raw_handshake()

    outcomes = receive_all(signer, stream, 1)

    assert len(outcomes) == 1
    assert isinstance(outcomes[0], ChannelError)


# ---- the handshake ---------------------------------------------------------------


async def _respond_to(messages: list[bytes]) -> ChannelError | channel.NoiseChannel:
    """Run respond() against a peer that sends ``messages`` as frames, then closes."""
    left, right = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=left)
    try:
        right.sendall(b"".join(_frame(message) for message in messages))
        right.shutdown(socket.SHUT_WR)
        try:
            return await channel.respond(
                reader, writer, SIGNER_KEY, lambda remote: remote == AGENT_KEY.public, timeout=RECEIVE_TIMEOUT
            )
        except ChannelError as exc:
            return exc
    finally:
        writer.close()
        right.close()


def _first_handshake_message() -> bytes:
    """Return a valid handshake message 1 ("-> e") of a new initiator."""
    return bytes(channel._new_connection(AGENT_KEY, initiator=True).write_message())


@given(
    st.one_of(
        st.lists(st.binary(max_size=120), min_size=1, max_size=3),
        mutated(st.builds(_first_handshake_message)).map(lambda first: [first, b"\x00" * 64]),
    )
)
def test_garbage_handshake_is_channel_error(messages: list[bytes]) -> None:
    result = asyncio.run(_respond_to(messages))

    assert isinstance(result, ChannelError)
    assert str(result)


@given(st.data())
def test_tampered_third_message_is_channel_error(data: st.DataObject) -> None:
    # The third message depends on the signer's ephemeral key, so it is
    # made during the exchange and then tampered with.
    agent = channel._new_connection(AGENT_KEY, initiator=True)

    async def run() -> ChannelError | channel.NoiseChannel:
        left, right = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=left)
        peer_reader, peer_writer = await asyncio.open_connection(sock=right)
        try:
            responder = asyncio.create_task(
                channel.respond(reader, writer, SIGNER_KEY, lambda remote: remote == AGENT_KEY.public, timeout=RECEIVE_TIMEOUT)
            )
            peer_writer.write(_frame(bytes(agent.write_message())))
            (length,) = struct.unpack(">H", await peer_reader.readexactly(2))
            agent.read_message(await peer_reader.readexactly(length))
            third = bytes(agent.write_message())
            tampered = data.draw(mutations_of(third).filter(lambda value: value != third), label="third message")
            peer_writer.write(_frame(tampered[:MAX_NOISE_MESSAGE]))
            peer_writer.close()
            try:
                return await responder
            except ChannelError as exc:
                return exc
        finally:
            writer.close()
            peer_writer.close()

    assert isinstance(asyncio.run(run()), ChannelError)


# ---- pairing messages as each side receives them ---------------------------------

pairing_payloads = st.one_of(
    st.builds(pairing.Hello, utf8_text(80)).map(pairing.encode),
    st.builds(pairing.Confirm, st.booleans(), utf8_text(40)).map(pairing.encode),
    st.builds(pairing.Result, st.booleans(), utf8_text(40)).map(pairing.encode),
    st.binary(max_size=40),
)


@given(bad_input(pairing_payloads), st.sampled_from(["signer", "agent"]))
def test_pairing_hello_gives_name_or_narrow_error(payload: bytes, receiver: str) -> None:
    async def run() -> pairing.Hello | Exception:
        left, right = socket.socketpair()
        agent_streams = await asyncio.open_connection(sock=left)
        signer_streams = await asyncio.open_connection(sock=right)
        try:
            agent, signer = await asyncio.gather(
                channel.initiate_pairing(*agent_streams, AGENT_KEY, timeout=RECEIVE_TIMEOUT),
                channel.respond_pairing(*signer_streams, SIGNER_KEY, timeout=RECEIVE_TIMEOUT),
            )
            sender, receiving = (agent, signer) if receiver == "signer" else (signer, agent)
            await sender.send(payload)
            try:
                return await asyncio.wait_for(pairing.receive_hello(receiving), RECEIVE_TIMEOUT)
            except (pairing.PairingRefusedError, ProtocolError) as exc:
                return exc
        finally:
            agent_streams[1].close()
            signer_streams[1].close()

    result = asyncio.run(run())

    if isinstance(result, Exception):
        assert str(result)
        return
    # Each side checks the proposed name before it shows it to a person.
    with tempfile.TemporaryDirectory(prefix="tpms-prop-") as home:
        for check_name in (
            lambda: DeviceRegistry(Path(home) / "devices.json").check_allow(result.name, AGENT_KEY.public),
            lambda: AgentHome(Path(home)).check_trust(result.name, SIGNER_KEY.public),
        ):
            try:
                check_name()
            except ConfigError as exc:
                assert "invalid" in str(exc)
