"""A client for one signer: a Noise connection made on demand and reused.

Requests carry ids, so several can be outstanding on one connection and a
listing does not wait behind a signature that waits for a person.  When the
connection fails, every outstanding request fails at once and the next
request opens a new connection, so a restarted signer is picked up without
restarting the agent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from tpmsigner.errors import ChannelError, ConfigError, ProtocolError, SignerError
from tpmsigner.protocol import channel
from tpmsigner.protocol.sessionbind import BindingEvidence
from tpmsigner.protocol.messages import (
    CONNECTION_REQUEST_ID,
    Failure,
    ListReply,
    ListRequest,
    Message,
    ProcessInfo,
    SignReply,
    SignRequest,
    decode_message,
    encode_message,
)

from .config import PinnedSigner

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
# How long to look for a signer pinned with the address "mdns".
MDNS_LOOKUP_TIMEOUT = 3.0
LIST_TIMEOUT = 10.0
# Longer than the signer's default approval timeout of 60 s, so the signer's
# own TIMED_OUT reply normally arrives first.
SIGN_TIMEOUT = 120.0
# Sign requests sent to one signer that wait for a reply.  It equals the
# signer's MAX_PENDING_PER_CONNECTION, so further requests wait here, within
# SIGN_TIMEOUT, instead of being rejected as busy by the signer.
MAX_SIGNS_IN_FLIGHT = 16


class SignerUnavailableError(SignerError):
    """The signer could not be reached, or the connection broke."""


class SignerClient:
    def __init__(
        self, signer: PinnedSigner, static_key: channel.StaticKey, mdns_interfaces: list[str] | None = None
    ) -> None:
        self.signer = signer
        self.static_key = static_key
        # IP addresses or names of the interfaces to look for an "mdns"
        # signer on; None means every interface.
        self.mdns_interfaces = mdns_interfaces
        self._secure: channel.NoiseChannel | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Future[channel.NoiseChannel] | None = None
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self._request_ids = itertools.count(1)
        self._sign_slots = asyncio.Semaphore(MAX_SIGNS_IN_FLIGHT)

    async def list_identities(self) -> list[tuple[bytes, str]]:
        reply = await self._request(lambda request_id: ListRequest(request_id), LIST_TIMEOUT)
        if isinstance(reply, ListReply):
            return [(identity.key_blob, identity.label) for identity in reply.identities]
        raise self._unexpected(reply)

    async def sign(
        self, key_blob: bytes, data: bytes, flags: int, process: ProcessInfo, evidence: BindingEvidence | None = None
    ) -> bytes:
        reply = await self._request(
            lambda request_id: SignRequest(request_id, key_blob, data, flags, process, evidence),
            SIGN_TIMEOUT,
            self._sign_slots,
        )
        if isinstance(reply, SignReply):
            return reply.signature
        raise self._unexpected(reply)

    async def close(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._secure is not None:
            await self._secure.close()
        self._fail_waiting("the agent is shutting down")

    def _unexpected(self, reply: Message) -> SignerError:
        if isinstance(reply, Failure):
            return SignerError(reply.message, code=reply.code)
        return SignerError(f"unexpected reply {type(reply).__name__} from signer {self.signer.name!r}")

    async def _request(self, build, timeout: float, slots: asyncio.Semaphore | None = None) -> Message:
        """Send one request and wait for its reply, all within ``timeout`` seconds.

        Waiting for one of ``slots``, connecting, sending (which blocks
        while the signer does not read) and waiting for the reply all count
        toward the same timeout.
        """

        async def exchange() -> Message:
            if slots is None:
                return await self._exchange(build)
            async with slots:
                return await self._exchange(build)

        try:
            return await asyncio.wait_for(exchange(), timeout)
        except asyncio.TimeoutError:
            raise SignerUnavailableError(f"signer {self.signer.name!r} did not reply within {timeout:g} s") from None

    def _next_request_id(self) -> int:
        """Return a 32-bit request id that no request in flight uses.

        The counter wraps after 2**32 requests.  CONNECTION_REQUEST_ID is
        reserved for failures about the whole connection.
        """
        while True:
            request_id = next(self._request_ids) & 0xFFFFFFFF
            if request_id != CONNECTION_REQUEST_ID and request_id not in self._waiting:
                return request_id

    async def _exchange(self, build) -> Message:
        request_id = self._next_request_id()
        payload = encode_message(build(request_id))
        if len(payload) > channel.MAX_PAYLOAD:
            raise SignerError(
                f"the request is {len(payload)} bytes, over the signer protocol's limit of "
                f"{channel.MAX_PAYLOAD} bytes per message"
            )

        secure = await self._connect()
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await secure.send(payload)
            return await future
        except ChannelError as exc:
            await self._disconnect(str(exc))
            raise SignerUnavailableError(f"signer {self.signer.name!r}: {exc}") from None
        finally:
            self._waiting.pop(request_id, None)

    async def _connect(self) -> channel.NoiseChannel:
        """Return the open channel, or join the one connection attempt under way.

        Requests that arrive while the signer is slow to answer wait for the
        same attempt instead of each starting one after another.
        """
        if self._secure is not None:
            return self._secure
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
            # Mark a failure as seen even when every waiter has timed out.
            self._connecting.add_done_callback(lambda attempt: attempt.cancelled() or attempt.exception())
        return await asyncio.shield(self._connecting)

    async def _open(self) -> channel.NoiseChannel:
        if self.signer.uses_mdns:
            reader, writer, address = await self._open_by_mdns()
        else:
            address = self.signer.address
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.signer.host, self.signer.port), CONNECT_TIMEOUT
                )
            except (OSError, asyncio.TimeoutError) as exc:
                reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else exc.strerror or str(exc)
                raise SignerUnavailableError(
                    f"cannot connect to signer {self.signer.name!r} at {address}: {reason}; "
                    "check that 'tpmsigner serve' runs there and listens on that address"
                ) from None
        try:
            secure = await channel.initiate(reader, writer, self.static_key, self.signer.public_key)
        except ChannelError as exc:
            writer.close()
            raise SignerUnavailableError(f"signer {self.signer.name!r} at {address}: {exc}") from None

        logger.info("connected to signer %r at %s", self.signer.name, address)
        self._secure = secure
        self._reader_task = asyncio.create_task(self._read_replies(secure))
        return secure

    async def _open_by_mdns(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        """Find the signer over mDNS by its key's fingerprint and connect to one of its addresses."""
        from tpmsigner.discovery import SIGNER_SERVICE

        from . import discovery

        fingerprint = channel.public_key_fingerprint(self.signer.public_key)
        try:
            services = await discovery.browse(
                SIGNER_SERVICE, MDNS_LOOKUP_TIMEOUT, self.mdns_interfaces, fingerprint=fingerprint
            )
        except ConfigError as exc:
            # An interface named at start has gone away since.
            raise SignerUnavailableError(f"cannot look for signer {self.signer.name!r} over mDNS: {exc}") from None
        if not services:
            raise SignerUnavailableError(
                f"signer {self.signer.name!r} ({fingerprint}) was not found over mDNS within "
                f"{MDNS_LOOKUP_TIMEOUT:g} s; check that 'tpmsigner serve' runs without --no-mdns on this network"
            )
        try:
            return await discovery.open_first(services[0])
        except OSError as exc:
            raise SignerUnavailableError(f"signer {self.signer.name!r}: {exc}") from None

    async def _read_replies(self, secure: channel.NoiseChannel) -> None:
        received_any = False
        rejection: str | None = None
        try:
            while True:
                payload = await secure.receive()
                received_any = True
                try:
                    message = decode_message(payload)
                except ProtocolError as exc:
                    # The reply's request id cannot be trusted either, so no
                    # waiting request can be matched with it.  Closing fails
                    # them all now instead of after their timeouts (up to
                    # minutes for a signature), and the next request reconnects.
                    reason = (
                        f"the signer sent a malformed reply ({exc}), so the connection was closed; "
                        "check that the signer and this agent run the same tpmsigner version"
                    )
                    logger.warning("signer %r: %s", self.signer.name, reason)
                    await self._reader_closed(secure, reason)
                    return
                if isinstance(message, Failure) and message.request_id == CONNECTION_REQUEST_ID:
                    # The signer closes the connection right after this.
                    rejection = message.message
                    continue
                future = self._waiting.get(message.request_id)
                if future is not None and not future.done():
                    future.set_result(message)
                else:
                    logger.debug(
                        "signer %r replied to request id %d, which no longer waits", self.signer.name, message.request_id
                    )
        except ChannelError as exc:
            reason = str(exc)
            if rejection is not None:
                reason = f"the signer rejected the connection: {rejection}"
            elif not received_any:
                # The signer closes the connection right after the handshake
                # when it does not allow this agent's key.
                reason += (
                    " before replying to anything; if the signer does not allow this agent, run "
                    "'tpmsigner allow NAME KEY' there with the key that 'tpmsigner-agent id' prints"
                )
            logger.warning("connection to signer %r closed: %s", self.signer.name, reason)
            await self._reader_closed(secure, reason)

    async def _reader_closed(self, secure: channel.NoiseChannel, reason: str) -> None:
        """Close ``secure``, forget it if it is still the current channel, and fail every waiting request."""
        if self._secure is secure:
            self._secure = None
        await secure.close()
        self._fail_waiting(reason)

    async def _disconnect(self, reason: str) -> None:
        secure, self._secure = self._secure, None
        if self._reader_task is not None:
            self._reader_task.cancel()
            self._reader_task = None
        if secure is not None:
            await secure.close()
        self._fail_waiting(reason)

    def _fail_waiting(self, reason: str) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(SignerUnavailableError(f"signer {self.signer.name!r}: {reason}"))
