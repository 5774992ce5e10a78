"""Another ssh-agent whose keys this agent offers beside its own (``run --upstream SOCKET``).

Each client connection gets its own connection to the upstream agent,
opened at the first request that needs it.  ssh binds an agent connection
to one session (session-bind@openssh.com, PROTOCOL.agent).  OpenSSH's
ssh-agent checks a key's destination constraints against the bindings of
the connection that a request arrives on.  So the upstream agent must see
the same bindings on one connection, as it would without this agent.

Requests for upstream keys are forwarded byte for byte, flags included, and
the upstream agent's reply is passed back unchanged.  When the upstream
connection breaks, for example because the upstream agent restarted, the
next request opens a new one and first replays the session bindings sent on
the old one.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

from tpmsigner.errors import TpmSignerError
from tpmsigner.protocol.sshwire import Byte, PacketDecodeError, SshReader
from tpmsigner.protocol.sshkeys import fingerprint_of_blob
from tpmsigner.ratelimit import RateLimitedLogger

from . import wire
from .audit import AuditEntry

logger = logging.getLogger(__name__)

# Key management requests (draft-miller-ssh-agent section 6.1).  This agent
# cannot add keys to a signer's TPM, so with an upstream agent these go
# there; without one they fail.  SSH_AGENTC_LOCK (22) and SSH_AGENTC_UNLOCK
# (23) are not forwarded: locking only the upstream agent would leave this
# agent's keys usable while ssh-add reports the agent as locked.
SSH_AGENTC_ADD_IDENTITY = 17
SSH_AGENTC_REMOVE_IDENTITY = 18
SSH_AGENTC_REMOVE_ALL_IDENTITIES = 19
SSH_AGENTC_ADD_SMARTCARD_KEY = 20
SSH_AGENTC_REMOVE_SMARTCARD_KEY = 21
SSH_AGENTC_ADD_ID_CONSTRAINED = 25
SSH_AGENTC_ADD_SMARTCARD_KEY_CONSTRAINED = 26

FORWARDED_KEY_MANAGEMENT = frozenset(
    {
        SSH_AGENTC_ADD_IDENTITY,
        SSH_AGENTC_REMOVE_IDENTITY,
        SSH_AGENTC_REMOVE_ALL_IDENTITIES,
        SSH_AGENTC_ADD_SMARTCARD_KEY,
        SSH_AGENTC_REMOVE_SMARTCARD_KEY,
        SSH_AGENTC_ADD_ID_CONSTRAINED,
        SSH_AGENTC_ADD_SMARTCARD_KEY_CONSTRAINED,
    }
)

CONNECT_TIMEOUT = 5.0
LIST_TIMEOUT = 10.0
# Signing with an upstream key added by `ssh-add -c` waits for a person to
# confirm, and adding a smartcard key waits for its provider to load.
REQUEST_TIMEOUT = 120.0


class UpstreamError(TpmSignerError):
    """The upstream agent cannot be reached, did not reply in time, or sent a malformed reply."""


class _ConnectionLost(UpstreamError):
    """The upstream agent closed the connection before replying."""


@dataclass(frozen=True)
class UpstreamSignResult:
    """The reply to a forwarded sign request, with its audit outcome."""

    reply: bytes
    outcome: str  # "signed", "error" or "unreachable", as in tpmsigner.audit.OUTCOMES
    reason: str


class UpstreamAgent:
    """The upstream agent's socket, and what the connections to it share."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._listed_blobs: set[bytes] = set()
        # Clients decide how often they list keys, so an upstream agent
        # that is down could otherwise fill the log.
        self._warnings = RateLimitedLogger(logger)

    def open_session(self) -> UpstreamSession:
        """Return the upstream side of a new client connection; it connects at its first request."""
        return UpstreamSession(self)

    def listed(self, key_blob: bytes) -> bool:
        """Tell whether the upstream agent listed this key the last time it was asked."""
        return key_blob in self._listed_blobs

    def remember_listing(self, identities: list[tuple[bytes, str]]) -> None:
        """Record which keys the upstream agent listed, to route sign requests without asking again."""
        self._listed_blobs = {blob for blob, _ in identities}

    def warn(self, what: str, exc: UpstreamError) -> None:
        """Log a failed upstream request, rate-limited."""
        self._warnings.warning("%s: %s", what, exc)


class UpstreamSession:
    """The connection to the upstream agent that belongs to one client connection.

    Requests are serialised by a lock: the ssh-agent protocol has one
    outstanding request per connection.
    """

    def __init__(self, agent: UpstreamAgent) -> None:
        self.agent = agent
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        # session-bind@openssh.com requests sent on this client connection,
        # replayed whenever a new upstream connection is opened.
        self._session_binds: list[bytes] = []

    # ---- requests the agent server makes ---------------------------------

    async def list_identities(self) -> list[tuple[bytes, str]] | None:
        """Return the upstream agent's keys, or None when it cannot be asked."""
        try:
            reply = await self.request(Byte(wire.SSH_AGENTC_REQUEST_IDENTITIES), LIST_TIMEOUT)
        except UpstreamError as exc:
            self.agent.warn("listing only this agent's keys, the upstream agent failed", exc)
            return None
        if reply[0] != wire.SSH_AGENT_IDENTITIES_ANSWER:
            # Some agents reply SSH_AGENT_FAILURE while they hold no key.
            logger.debug("the upstream agent replied with message type %d to a key listing", reply[0])
            return []
        try:
            identities = decode_identities(reply[1:])
        except UpstreamError as exc:
            self.agent.warn("listing only this agent's keys", exc)
            return None
        self.agent.remember_listing(identities)
        return identities

    async def sign(self, message: bytes, audit: AuditEntry) -> UpstreamSignResult:
        """Forward an SSH_AGENTC_SIGN_REQUEST unchanged and return the upstream agent's reply."""
        logger.info(
            "sign request from %s: key %s, %s, forwarded to the upstream agent",
            audit.process.describe(),
            audit.fingerprint,
            audit.info.purpose,
        )
        try:
            reply = await self.request(message, REQUEST_TIMEOUT)
        except UpstreamError as exc:
            self.agent.warn("a sign request for an upstream key failed", exc)
            return UpstreamSignResult(wire.FAILURE, "unreachable", str(exc))
        if reply[0] == wire.SSH_AGENT_SIGN_RESPONSE:
            logger.info("the upstream agent signed with key %s", audit.fingerprint)
            return UpstreamSignResult(reply, "signed", "")
        reason = f"the upstream agent replied with message type {reply[0]}, not a signature"
        logger.info("sign request for upstream key %s failed: %s", audit.fingerprint, reason)
        return UpstreamSignResult(reply, "error", reason)

    async def forward(self, message: bytes) -> bytes:
        """Forward a request unchanged and return the reply, or SSH_AGENT_FAILURE when the upstream agent fails."""
        try:
            return await self.request(message, REQUEST_TIMEOUT)
        except UpstreamError as exc:
            self.agent.warn(f"a request of type {message[0]} for the upstream agent failed", exc)
            return wire.FAILURE

    async def forward_key_management(self, message: bytes, own_keys: Container[bytes]) -> bytes:
        """Forward an add or remove request; reject the removal of a key that this agent's signers hold."""
        if message[0] == SSH_AGENTC_REMOVE_IDENTITY:
            try:
                packet = SshReader(message[1:])
                key_blob = packet.get_string()
                packet.check_end()
            except PacketDecodeError as exc:
                logger.debug("malformed remove-identity request: %s", exc)
                return wire.FAILURE
            if key_blob in own_keys:
                logger.info(
                    "rejected the removal of key %s: a signer holds it, and only upstream keys can be removed",
                    fingerprint_of_blob(key_blob),
                )
                return wire.FAILURE
        return await self.forward(message)

    async def bind(self, message: bytes) -> None:
        """Pass on a session-bind@openssh.com request that this agent accepted.

        It is sent now if the upstream connection is open, and otherwise
        when the connection is opened, before any other request.
        """
        if message in self._session_binds:
            # ssh may repeat a binding; the upstream agent has it already.
            return
        self._session_binds.append(message)
        async with self._lock:
            if self._writer is None:
                return
            try:
                reply = await asyncio.wait_for(self._round_trip(message), LIST_TIMEOUT)
            except (UpstreamError, asyncio.TimeoutError) as exc:
                # The binding is replayed on the next connection.
                logger.debug("passing a session binding to the upstream agent failed: %s", exc or "timed out")
                self._disconnect()
                return
        if reply[0] != wire.SSH_AGENT_SUCCESS:
            logger.debug("the upstream agent replied with message type %d to a session binding", reply[0])

    def close(self) -> None:
        self._disconnect()

    # ---- the connection ---------------------------------------------------

    async def request(self, message: bytes, timeout: float) -> bytes:
        """Send one request and return the reply, all within ``timeout`` seconds.

        If a connection opened for an earlier request was closed by the
        upstream agent (it restarted, say), the request is sent once more on
        a new connection.  A sign request may then reach an upstream agent
        twice, which signs twice; nothing else changes.
        """
        async with self._lock:
            try:
                return await asyncio.wait_for(self._request_with_retry(message), timeout)
            except asyncio.TimeoutError:
                self._disconnect()
                raise UpstreamError(f"the upstream agent at {self.agent.path} did not reply within {timeout:g} s") from None
            except UpstreamError:
                self._disconnect()
                raise

    async def _request_with_retry(self, message: bytes) -> bytes:
        reused = self._writer is not None
        try:
            await self._ensure_connected()
            return await self._round_trip(message)
        except _ConnectionLost:
            if not reused:
                raise
            logger.info("the upstream agent at %s closed the connection; reconnecting", self.agent.path)
            self._disconnect()
        await self._ensure_connected()
        return await self._round_trip(message)

    async def _ensure_connected(self) -> None:
        if self._writer is not None:
            return
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.agent.path)), CONNECT_TIMEOUT)
        except asyncio.TimeoutError:
            raise UpstreamError(f"connecting to the upstream agent at {self.agent.path} timed out") from None
        except OSError as exc:
            raise UpstreamError(
                f"cannot connect to the upstream agent at {self.agent.path}: {exc.strerror or exc}"
            ) from None
        self._reader, self._writer = reader, writer

        for bind in self._session_binds:
            reply = await self._round_trip(bind)
            if reply[0] != wire.SSH_AGENT_SUCCESS:
                logger.debug("the upstream agent replied with message type %d to a replayed session binding", reply[0])

    async def _round_trip(self, message: bytes) -> bytes:
        """Write one framed message and read one framed reply on the open connection."""
        assert self._reader is not None and self._writer is not None
        try:
            self._writer.write(wire.frame(message))
            await self._writer.drain()
            header = await self._reader.readexactly(4)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise _ConnectionLost(f"the upstream agent at {self.agent.path} closed the connection: {exc}") from None

        (length,) = struct.unpack(">I", header)
        if length == 0 or length > wire.MAX_MESSAGE_LENGTH:
            raise UpstreamError(
                f"the upstream agent at {self.agent.path} sent a reply length of {length} bytes; "
                f"the limit is {wire.MAX_MESSAGE_LENGTH}"
            )
        try:
            return await self._reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            # Part of the reply arrived, so the request reached the agent:
            # do not send it again.
            raise UpstreamError(f"the upstream agent at {self.agent.path} closed the connection mid-reply: {exc}") from None

    def _disconnect(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()


def decode_identities(body: bytes) -> list[tuple[bytes, str]]:
    """Parse SSH_AGENT_IDENTITIES_ANSWER contents from the upstream agent.

    A comment that is not UTF-8 is kept with its invalid bytes replaced,
    instead of dropping the listing.
    """
    try:
        packet = SshReader(body)
        count = packet.get_uint32()
        identities = []
        for _ in range(count):
            blob = packet.get_string()
            comment = packet.get_string().decode("utf-8", errors="replace")
            identities.append((blob, comment))
        packet.check_end()
    except PacketDecodeError as exc:
        raise UpstreamError(f"the upstream agent sent a malformed key listing: {exc}") from None
    return identities
