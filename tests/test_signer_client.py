"""The agent's signer client against a paired peer that breaks the protocol.

A real signer never sends a reply it cannot encode, so the peer here is a
small Noise responder that completes the real handshake and then replies
to the first request with bytes that are not a message.  The client must fail
the waiting request at once, with a clear reason, instead of waiting out
its timeout, and must reconnect for the next request.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from tpmsigner.protocol import channel
from tpmsigner.protocol.messages import ListReply, ListedIdentity, decode_message, encode_message
from tpmsigner_agent.config import PinnedSigner
from tpmsigner_agent.signer_client import SignerClient, SignerUnavailableError

LOCALHOST = "127.0.0.1"
# A guard against a hang. The reply is expected within milliseconds.
GUARD_SECONDS = 8.0


class BrokenSigner:
    """A Noise responder that replies with garbage on the first connection and correctly on later ones."""

    def __init__(self, agent_public: bytes) -> None:
        self.static = channel.StaticKey.generate()
        self.agent_public = agent_public
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, LOCALHOST, 0)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        broken = self.connections == 1
        secure = await channel.respond(reader, writer, self.static, lambda key: key == self.agent_public)
        try:
            while True:
                request = decode_message(await secure.receive())
                if broken:
                    await secure.send(b"\xfe not a message")
                else:
                    identity = ListedIdentity(key_blob=b"blob", label="after-reconnect")
                    await secure.send(encode_message(ListReply(request.request_id, (identity,))))
        except channel.ChannelError:
            pass
        finally:
            await secure.close()


def test_malformed_reply_fails_fast_and_reconnects(caplog: pytest.LogCaptureFixture) -> None:
    agent_key = channel.StaticKey.generate()
    signer = BrokenSigner(agent_key.public)

    async def run() -> tuple[str, list[tuple[bytes, str]]]:
        port = await signer.start()
        client = SignerClient(PinnedSigner("broken", LOCALHOST, port, signer.static.public), agent_key)
        try:
            with pytest.raises(SignerUnavailableError) as caught:
                await asyncio.wait_for(client.list_identities(), GUARD_SECONDS)
            listed = await asyncio.wait_for(client.list_identities(), GUARD_SECONDS)
            return str(caught.value), listed
        finally:
            await client.close()
            await signer.stop()

    with caplog.at_level(logging.WARNING):
        message, listed = asyncio.run(run())

    assert "malformed reply" in message
    assert "same tpmsigner version" in message
    assert listed == [(b"blob", "after-reconnect")]
    assert signer.connections == 2
    assert any("malformed reply" in record.getMessage() for record in caplog.records)
