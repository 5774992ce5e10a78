"""Memory-growth property: decoding bad input again and again holds on to nothing.

A decoder that kept something per rejected input (a cache keyed by it, a
list of errors, a reference cycle holding a traceback) would let a peer
that sends garbage forever grow the agent or the signer without bound.
Each test decodes a batch of bad inputs once to warm caches up, then many
more times under tracemalloc, and checks that the memory still allocated
afterwards stays within a small bound.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.mutations import bad_input
from tests.test_properties_channel import _raw_handshake, encrypt_plaintexts, fragmented_messages
from tests.test_properties_files import key_files
from tests.test_properties_protocol import (
    agent_sign_requests,
    encoded_messages,
    evidences,
    identity_lists,
    key_blobs,
    pairing_messages,
    signed_binds,
    userauth_requests,
)
from tpmsigner import pairing
from tpmsigner.errors import ChannelError, ConfigError, KeyFileError, ProtocolError
from tpmsigner.keyfile import read_key_file
from tpmsigner.protocol import channel
from tpmsigner.protocol.channel import parse_public_key
from tpmsigner.protocol.messages import decode_message, request_id_of
from tpmsigner.protocol.sessionbind import decode_evidence, decode_session_bind, encode_evidence, encode_session_bind, verify_session_bind
from tpmsigner.protocol.signeddata import describe_signed_data
from tpmsigner.protocol.sshkeys import public_key_from_blob
from tpmsigner_agent import wire
from tpmsigner_agent.destination import parse_ssh_command

# Rounds of the whole batch under tracemalloc, after one round of warm-up.
# With at least 10 inputs a batch, a decoder runs at least 1000 times, so a
# leak of 33 bytes or more per decode exceeds GROWTH_LIMIT.  receive() runs
# at least 100 times, so a leak of 330 bytes per channel exceeds it too.
ROUNDS = 100
CHANNEL_ROUNDS = 20
GROWTH_LIMIT = 32 * 1024
# Each example runs a whole batch 100 times, so few examples are needed.
MEMORY_SETTINGS = settings(max_examples=min(settings.default.max_examples, 10))


def _session_bind_checked(contents: bytes) -> bool:
    return verify_session_bind(decode_session_bind(contents))


def _ssh_command(data: bytes) -> object:
    arguments = data.decode("utf-8", errors="replace").split("\0")
    return parse_ssh_command(["ssh", *arguments], "/home/memory")


DECODERS = {
    "signer message": (decode_message, (ProtocolError,), bad_input(encoded_messages)),
    "request id": (request_id_of, (), bad_input(encoded_messages)),
    "agent sign request": (
        wire.decode_sign_request,
        (ProtocolError,),
        bad_input(agent_sign_requests.map(lambda request: wire.encode_sign_request(request)[1:])),
    ),
    "identities answer": (
        wire.decode_identities_answer,
        (ProtocolError,),
        bad_input(identity_lists.map(lambda identities: wire.encode_identities_answer(identities)[1:])),
    ),
    "extension": (wire.decode_extension, (ProtocolError,), st.binary(max_size=64)),
    "session bind": (_session_bind_checked, (ProtocolError,), bad_input(signed_binds().map(encode_session_bind))),
    "evidence": (decode_evidence, (ProtocolError,), bad_input(evidences.map(lambda evidence: encode_evidence(evidence)[4:]))),
    "signed data": (
        lambda data: describe_signed_data(data, b"key"),
        (),
        bad_input(userauth_requests().map(lambda request: request[0])),
    ),
    "ssh key blob": (public_key_from_blob, (ProtocolError,), bad_input(key_blobs)),
    "pairing message": (pairing.decode, (ProtocolError,), bad_input(pairing_messages.map(pairing.encode))),
    "key file": (read_key_file, (KeyFileError,), key_files),
    "noise public key": (
        lambda data: parse_public_key(data.decode("utf-8", errors="replace")),
        (ConfigError,),
        st.binary(max_size=80),
    ),
    "ssh command line": (_ssh_command, (), st.binary(max_size=80)),
}


def _decode_batch(decode, rejections, inputs: list[bytes]) -> None:
    for data in inputs:
        try:
            decode(data)
        except rejections:
            pass


def _growth(run, rounds: int) -> int:
    """Return the bytes still allocated after ``rounds`` calls of ``run``, after one warm-up call."""
    run()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(rounds):
            run()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_memory_stays_bounded(name: str) -> None:
    decode, rejections, inputs = DECODERS[name]

    @MEMORY_SETTINGS
    @given(st.lists(inputs, min_size=10, max_size=20))
    def check(batch: list[bytes]) -> None:
        growth = _growth(lambda: _decode_batch(decode, rejections, batch), ROUNDS)
        assert growth < GROWTH_LIMIT, f"{growth} bytes still allocated after {ROUNDS} rounds of {len(batch)} inputs"

    check()


@MEMORY_SETTINGS
@given(st.lists(fragmented_messages(), min_size=5, max_size=10), st.binary(max_size=32))
def test_channel_receive_memory_stays_bounded(cases, garbage: bytes) -> None:
    # Each stream ends in a frame of garbage, so each channel ends in ChannelError.
    async def receive_all() -> None:
        for _, plaintexts in cases:
            agent, signer = _raw_handshake()
            reader = asyncio.StreamReader()
            reader.feed_data(encrypt_plaintexts(agent, plaintexts) + len(garbage).to_bytes(2, "big") + garbage)
            reader.feed_eof()
            # receive() never writes, so the channel needs no writer here.
            secure = channel.NoiseChannel(signer, b"\x00" * 32, reader, None)
            try:
                while True:
                    await secure.receive()
            except ChannelError:
                pass

    growth = _growth(lambda: asyncio.run(receive_all()), CHANNEL_ROUNDS)

    assert growth < GROWTH_LIMIT, f"{growth} bytes still allocated after {CHANNEL_ROUNDS} rounds of {len(cases)} streams"
