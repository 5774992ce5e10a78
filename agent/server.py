"""The ssh-agent socket: read client messages and reply to each exactly once."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import struct
import time
from collections import OrderedDict

from tpmsigner.audit import AuditLog, outcome_for_failure
from tpmsigner.errors import ProtocolError, SignerError, TpmSignerError
from tpmsigner.protocol.channel import StaticKey
from tpmsigner.protocol.sessionbind import SESSION_BIND_EXTENSION, decode_session_bind, verify_session_bind
from tpmsigner.protocol.signeddata import PURPOSE_SSH_LOGIN, describe_signed_data
from tpmsigner.protocol.sshkeys import fingerprint_of_blob
from tpmsigner.ratelimit import RateLimitedLogger

from . import wire
from .audit import AuditEntry
from .config import PinnedSigner
from .destination import BindingRejected, ConnectionBindings, evidence_for
from .peer import PeerCredentials, peer_credentials, process_arguments, process_info
from .signer_client import SignerClient, SignerUnavailableError
from .socket_path import LISTEN_BACKLOG
from .upstream import FORWARDED_KEY_MANAGEMENT, UpstreamAgent, UpstreamSession

logger = logging.getLogger(__name__)

# Once a message has started, the rest must follow within this time.  An
# idle connection between messages may stay open as long as the client
# likes, as with OpenSSH's ssh-agent.
MESSAGE_BODY_TIMEOUT = 10.0
# Client connections open at once.  ssh, ssh-add and git each hold one
# while they run, so even a busy desktop has a few dozen.  Far more means a
# client that leaks connections, and each costs a file descriptor and a task.
MAX_CLIENT_CONNECTIONS = 128
# Keys whose signer the agent remembers.  A key that its signer no longer
# lists (disabled, deleted, or the signer is down) stays, so a request for
# it still goes to that signer, which rejects it and records the attempt.
# Beyond this, the keys listed least recently are forgotten.
MAX_REMEMBERED_KEYS = 4 * wire.MAX_IDENTITIES


class AgentServer:
    """Serves the ssh-agent protocol on a UNIX socket for a set of signers."""

    def __init__(
        self,
        signers: list[PinnedSigner],
        static_key: StaticKey,
        audit_log: AuditLog | None = None,
        upstream: UpstreamAgent | None = None,
        mdns_interfaces: list[str] | None = None,
    ) -> None:
        self.clients = [SignerClient(signer, static_key, mdns_interfaces) for signer in signers]
        self.audit_log = audit_log
        self.upstream = upstream
        self._audit_ids = itertools.count(1)
        # The signer that last listed each key, least recently listed first.
        self._key_owner: OrderedDict[bytes, SignerClient] = OrderedDict()
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        # Another local user can connect as often as they like.
        self._refusal_log = RateLimitedLogger(logger)
        self._connection_limit_log = RateLimitedLogger(logger)
        self._listing_limit_log = RateLimitedLogger(logger)
        # Warnings that a client can cause by what it sends.
        self._peer_log = RateLimitedLogger(logger)

    async def start(self, sock: socket.socket) -> None:
        """Serve on an already bound and listening UNIX socket."""
        # asyncio calls listen() again, with a default backlog of 100 when
        # none is passed.
        self._server = await asyncio.start_unix_server(self._accept, sock=sock, backlog=LISTEN_BACKLOG)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=5.0)
        for client in self.clients:
            await client.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        credentials = peer_credentials(sock) if sock is not None else None
        if len(self._connections) >= MAX_CLIENT_CONNECTIONS:
            self._connection_limit_log.warning(
                "%d client connections are open, the maximum; closing the new one from pid %s",
                len(self._connections),
                credentials.pid if credentials is not None else "unknown",
            )
            writer.close()
            return

        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        upstream = self.upstream.open_session() if self.upstream is not None else None
        try:
            if not self._peer_allowed(credentials):
                return
            await self._serve(reader, writer, credentials, upstream)
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            if upstream is not None:
                upstream.close()

    def _peer_allowed(self, credentials: PeerCredentials | None) -> bool:
        """Accept only the agent's own uid and root, as OpenSSH's ssh-agent does.

        The check uses the kernel's SO_PEERCRED record, so it applies even
        when the socket's file mode or its directory has been loosened.
        """
        if credentials is None:
            self._refusal_log.warning(
                "refused an agent connection: the kernel did not report the peer's uid (SO_PEERCRED)"
            )
            return False
        if credentials.uid not in (0, os.getuid()):
            self._refusal_log.warning(
                "refused an agent connection from uid %d (pid %d): only uid %d, which runs this agent, and root "
                "may use it",
                credentials.uid,
                credentials.pid,
                os.getuid(),
            )
            return False
        return True

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        credentials: PeerCredentials | None,
        upstream: UpstreamSession | None = None,
    ) -> None:
        bindings = ConnectionBindings()
        while True:
            try:
                # Waiting for the next message has no limit; once its first
                # byte arrives, the rest must follow in time.
                first = await reader.readexactly(1)
                header = first + await asyncio.wait_for(reader.readexactly(3), MESSAGE_BODY_TIMEOUT)
            except asyncio.TimeoutError:
                self._peer_log.warning("client sent part of a message header, then stalled; closing")
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            (length,) = struct.unpack(">I", header)

            if length == 0 or length > wire.MAX_MESSAGE_LENGTH:
                # The stream cannot be resynchronised after a bad length, so
                # reply once and close, as OpenSSH's ssh-agent closes too.
                self._peer_log.warning("client sent a message length of %d bytes; closing the connection", length)
                await self._write(writer, wire.FAILURE)
                return

            try:
                message = await asyncio.wait_for(reader.readexactly(length), MESSAGE_BODY_TIMEOUT)
            except asyncio.TimeoutError:
                self._peer_log.warning("client started a %d-byte message but did not finish it; closing", length)
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                return

            try:
                reply = await self._handle(message, credentials, bindings, upstream)
            except Exception:  # noqa: BLE001 - a bug must cost one request, not the connection
                logger.exception("handling a message of type %d failed with an unexpected error", message[0])
                reply = wire.FAILURE
            if not await self._write(writer, reply):
                return

    async def _write(self, writer: asyncio.StreamWriter, message: bytes) -> bool:
        writer.write(wire.frame(message))
        try:
            await writer.drain()
        except ConnectionError:
            return False
        return True

    async def _handle(
        self,
        message: bytes,
        credentials: PeerCredentials | None,
        bindings: ConnectionBindings,
        upstream: UpstreamSession | None = None,
    ) -> bytes:
        message_type, body = message[0], message[1:]
        if message_type == wire.SSH_AGENTC_REQUEST_IDENTITIES:
            return await self._list_identities(upstream)
        if message_type == wire.SSH_AGENTC_SIGN_REQUEST:
            return await self._sign(body, credentials, bindings, upstream)
        if message_type == wire.SSH_AGENTC_EXTENSION:
            return await self._extension(body, bindings, upstream)
        if upstream is not None and message_type in FORWARDED_KEY_MANAGEMENT:
            return await upstream.forward_key_management(message, self._key_owner)

        # Adding keys, locking and smartcards fail politely: the keys live
        # on the signer, not here.
        logger.debug("replying SSH_AGENT_FAILURE to message type %d", message_type)
        return wire.FAILURE

    async def _extension(self, body: bytes, bindings: ConnectionBindings, upstream: UpstreamSession | None) -> bytes:
        """Handle SSH_AGENTC_EXTENSION (PROTOCOL.agent, "extension mechanism")."""
        try:
            name, contents = wire.decode_extension(body)
        except ProtocolError as exc:
            self._peer_log.warning("malformed extension request: %s", exc)
            return wire.FAILURE

        if name == wire.QUERY_EXTENSION:
            return wire.encode_query_reply([wire.QUERY_EXTENSION, SESSION_BIND_EXTENSION])
        if name != SESSION_BIND_EXTENSION:
            if upstream is not None:
                return await upstream.forward(bytes([wire.SSH_AGENTC_EXTENSION]) + body)
            logger.debug("unsupported extension %r", name[:64])
            return wire.FAILURE

        try:
            bind = decode_session_bind(contents)
        except ProtocolError as exc:
            self._peer_log.warning("%s", exc)
            return wire.FAILURE
        if not verify_session_bind(bind):
            self._peer_log.warning(
                "session-bind with host key %s has a bad signature; rejected", bind.host_key_fingerprint
            )
            return wire.EXTENSION_FAILURE
        try:
            bindings.add(bind)
        except BindingRejected as exc:
            self._peer_log.warning("session-bind with host key %s rejected: %s", bind.host_key_fingerprint, exc)
            return wire.FAILURE
        logger.debug("connection bound to host key %s (forwarding: %s)", bind.host_key_fingerprint, bind.is_forwarding)
        if upstream is not None:
            # The upstream agent checks its keys' destination constraints
            # against the bindings of its own connection.
            await upstream.bind(bytes([wire.SSH_AGENTC_EXTENSION]) + body)
        return wire.SUCCESS

    async def _list_identities(self, upstream: UpstreamSession | None = None) -> bytes:
        results, upstream_identities = await asyncio.gather(
            asyncio.gather(*(client.list_identities() for client in self.clients), return_exceptions=True),
            upstream.list_identities() if upstream is not None else _no_identities(),
        )
        identities: list[tuple[bytes, str]] = []
        owners: dict[bytes, SignerClient] = {}
        upstream_seen: set[bytes] = set()
        failed: list[SignerClient] = []
        for client, result in zip(self.clients, results):
            if isinstance(result, BaseException):
                failed.append(client)
                self._peer_log.warning("listing keys of signer %r failed: %s", client.signer.name, result)
                continue
            for blob, label in result:
                # A key offered by two pinned signers (or one signer pinned
                # twice) is listed once, so ssh tries it, and prompts, once.
                if blob in owners:
                    continue
                owners[blob] = client
                identities.append((blob, label))

        for blob, owner in owners.items():
            self._key_owner[blob] = owner
            self._key_owner.move_to_end(blob)
        while len(self._key_owner) > max(MAX_REMEMBERED_KEYS, len(owners)):
            self._key_owner.popitem(last=False)

        # This agent's keys come first and win over an upstream key with the
        # same blob, so their use is always approved on the signer.
        for blob, label in upstream_identities or []:
            if blob not in owners and blob not in upstream_seen:
                upstream_seen.add(blob)
                identities.append((blob, label))

        if self.clients and len(failed) == len(self.clients) and upstream_identities is None:
            return wire.FAILURE
        answer = wire.encode_identities_answer(identities)
        if len(identities) > wire.MAX_IDENTITIES or len(answer) > wire.MAX_MESSAGE_LENGTH:
            # OpenSSH's ssh and ssh-add reject such a reply as malformed, so
            # a clear failure here is more useful than a truncated list.
            self._listing_limit_log.error(
                "the signers list %d identities in %d bytes, over the %d identities or %d bytes that ssh-agent "
                "clients accept; replying SSH_AGENT_FAILURE. Disable identities on the signers with "
                "'tpmsigner disable LABEL', or pin fewer signers",
                len(identities),
                len(answer),
                wire.MAX_IDENTITIES,
                wire.MAX_MESSAGE_LENGTH,
            )
            return wire.FAILURE
        return answer

    async def _owner_of(self, key_blob: bytes) -> SignerClient | None:
        if key_blob not in self._key_owner:
            await self._list_identities()
        return self._key_owner.get(key_blob)

    async def _sign(
        self,
        body: bytes,
        credentials: PeerCredentials | None,
        bindings: ConnectionBindings,
        upstream: UpstreamSession | None = None,
    ) -> bytes:
        try:
            request = wire.decode_sign_request(body)
        except ProtocolError as exc:
            self._peer_log.warning("malformed sign request (%d bytes): %s", len(body), exc)
            return wire.FAILURE

        request_id = next(self._audit_ids)
        started = time.monotonic()
        process = process_info(credentials)
        info = describe_signed_data(request.data, request.key_blob)
        fingerprint = fingerprint_of_blob(request.key_blob)
        audit = AuditEntry(request_id, started, process, fingerprint, info)
        if upstream is not None and await self._is_upstream_key(request.key_blob, upstream):
            return await self._sign_upstream(bytes([wire.SSH_AGENTC_SIGN_REQUEST]) + body, audit, upstream)

        evidence = None
        if info.purpose == PURPOSE_SSH_LOGIN:
            try:
                evidence = evidence_for(
                    bindings, info, process_arguments(credentials), credentials.uid if credentials else None
                )
            except BindingRejected as exc:
                self._peer_log.warning(
                    "sign request from %s for key %s rejected: %s", process.describe(), fingerprint, exc
                )
                self._record(audit, "error", str(exc))
                return wire.FAILURE
        audit.evidence = evidence

        client = await self._owner_of(request.key_blob)
        if client is None:
            logger.info("sign request from %s for unknown key %s: failed", process.describe(), fingerprint)
            self._record(audit, "error", "no trusted signer holds this key")
            return wire.FAILURE
        audit.signer = client.signer.name

        if evidence is not None:
            destination = f" to {info.user}@{evidence.host_name or '?'}"
        elif info.destination:
            destination = f" to {info.destination}"
        else:
            destination = ""
        logger.info(
            "sign request from %s: key %s, %s%s, sent to signer %r",
            process.describe(),
            fingerprint,
            info.purpose,
            destination,
            client.signer.name,
        )
        try:
            signature = await client.sign(request.key_blob, request.data, request.flags, process, evidence)
        except SignerUnavailableError as exc:
            logger.info("sign request for %s failed after %.1f s: %s", fingerprint, time.monotonic() - started, exc)
            self._record(audit, "unreachable", str(exc))
            return wire.FAILURE
        except SignerError as exc:
            logger.info("sign request for %s failed after %.1f s: %s", fingerprint, time.monotonic() - started, exc)
            self._record(audit, outcome_for_failure(exc.code), str(exc))
            return wire.FAILURE

        logger.info("sign request for %s approved after %.1f s", fingerprint, time.monotonic() - started)
        self._record(audit, "approved", "")
        return wire.encode_sign_response(signature)

    async def _is_upstream_key(self, key_blob: bytes, upstream: UpstreamSession) -> bool:
        """Tell whether a sign request goes upstream: for any key that no signer of this agent holds."""
        if key_blob in self._key_owner:
            return False
        if upstream.agent.listed(key_blob):
            return True
        return await self._owner_of(key_blob) is None

    async def _sign_upstream(self, message: bytes, audit: AuditEntry, upstream: UpstreamSession) -> bytes:
        audit.upstream = str(upstream.agent.path)
        result = await upstream.sign(message, audit)
        self._record(audit, result.outcome, result.reason)
        return result.reply

    def _record(self, entry: AuditEntry, outcome: str, reason: str) -> None:
        if self.audit_log is None:
            return
        try:
            self.audit_log.append(entry.to_record(outcome, reason))
        except (OSError, TpmSignerError) as exc:
            # The log line is all that remains of the lost record, so it names the outcome.
            logger.error(
                "the audit record of sign request %d (key %s, outcome %s) was not written: %s",
                entry.request_id,
                entry.fingerprint,
                outcome,
                exc,
            )


async def _no_identities() -> None:
    return None
