"""The signer's Noise server: authenticate agents, list keys, sign on approval."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import socket
import time
from dataclasses import dataclass, field

from ..audit import AuditLog, outcome_for_failure
from ..errors import (
    CertificateError,
    ChannelClosedError,
    ChannelError,
    TpmSignerError,
    ConfigError,
    IdentityNotFoundError,
    KeyStoreError,
    PeerNotTrustedError,
    ProtocolError,
    TpmAuthError,
    TpmError,
    TpmKeyLoadError,
    TpmLockoutError,
    TpmUnavailableError,
    UnsupportedByTpmError,
)
from ..protocol import channel
from ..ratelimit import RateLimitedLogger
from ..protocol.messages import (
    CONNECTION_REQUEST_ID,
    Failure,
    FailureCode,
    ListedIdentity,
    ListReply,
    ListRequest,
    Message,
    SignReply,
    SignRequest,
    decode_message,
    encode_message,
    request_id_of,
)
from ..protocol.signeddata import describe_signed_data
from ..protocol.sshkeys import fingerprint_of_blob
from ..identities import sign_data
from .destination import DestinationError, check_destination
from ..store import Identity, KeyStore
from ..tpm import LockoutStatus, Tpm
from .admission import MAX_HANDSHAKE_ATTEMPTS, HandshakeAdmission
from .approvers import DEFAULT_APPROVAL_TIMEOUT, ApprovalRequest, Approver
from .certificate_use import certificate_in_use
from .devices import Device, DeviceRegistry
from .lastuse import LastUseRecorder
from .notify import DesktopNotifier
from .refusals import RefusalPolicy, RefusalTracker
from .worker import TpmWorker

logger = logging.getLogger(__name__)

# Connections the kernel queues before serve accepts them; asyncio's default.
LISTEN_BACKLOG = 100
# Requests one agent may have in flight at once.  More than a handful means
# a runaway or hostile client, and each sign request may hold a prompt.
MAX_PENDING_PER_CONNECTION = 16
# Sign requests waiting for the approver, over all connections.  Each one
# may hold a prompt or an approver process, and a person answers them one
# at a time, so a longer queue only means more requests that time out.
MAX_WAITING_APPROVALS = 32
# Authenticated connections of one device at a time.  An agent keeps one
# connection per signer, and the rest leave room for agents that share a
# device key.
MAX_CONNECTIONS_PER_DEVICE = 8
# Identities in one listing, the first ones by label.  It bounds the work
# of a listing and keeps a LIST_REPLY under channel.MAX_PAYLOAD.  An entry
# with an RSA-3072 key, the largest type keygen makes, takes 479 bytes: a
# 407-byte key blob, a 64-byte label and two length fields.  Even imported
# RSA-4096 keys, at 607 bytes an entry, fit 1,024 times in 1 MiB.
MAX_LISTED_IDENTITIES = 1024
# How often serve checks devices.json for revoked devices with idle
# connections, and the least time between two last-seen writes per device.
REVOCATION_CHECK_INTERVAL = 1.0
LAST_SEEN_INTERVAL = 60.0


@dataclass
class SignerConfig:
    """Settings of a running signer."""

    host: str
    port: int
    approval_timeout: float = DEFAULT_APPROVAL_TIMEOUT
    refusals: RefusalPolicy = field(default_factory=RefusalPolicy)
    handshake_attempts: int = MAX_HANDSHAKE_ATTEMPTS    # per source address per minute


class SignerServer:
    """Accepts agent connections and serves list and sign requests."""

    def __init__(
        self,
        store: KeyStore,
        worker: TpmWorker,
        static_key: channel.StaticKey,
        devices: DeviceRegistry,
        approver: Approver,
        config: SignerConfig,
        audit_log: AuditLog | None = None,
        notifier: DesktopNotifier | None = None,
    ) -> None:
        self.store = store
        self.worker = worker
        self.static_key = static_key
        self.devices = devices
        self.approver = approver
        self.config = config
        self.audit_log = audit_log
        self.notifier = notifier
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        # Request numbers for logs and prompts, unique in this signer run;
        # agents' own request ids repeat across devices and connections.
        self._serials = itertools.count(1)
        # Anyone who can reach the port can fail a handshake, as often as
        # they like, so those warnings are rate-limited.
        self._handshake_log = RateLimitedLogger(logger)
        self._admission = HandshakeAdmission(config.handshake_attempts)
        self._admission_log = RateLimitedLogger(logger)
        self._device_limit_log = RateLimitedLogger(logger)
        self._devices_file_log = RateLimitedLogger(logger)
        self.listing_limit_log = RateLimitedLogger(logger, limit=1)
        self.waiting_approvals = 0
        self._sessions: set[_AgentSession] = set()
        self._revocation_task: asyncio.Task[None] | None = None
        self._devices_file_state: tuple[int, int, int] | None = None
        self._last_seen_written: dict[bytes, float] = {}
        self.refusals = RefusalTracker(config.refusals)
        self.last_use = LastUseRecorder(store)

    def next_serial(self) -> int:
        return next(self._serials)

    def audit(self, record: dict[str, object]) -> None:
        """Append a request's record to the signer's audit log, if it has one."""
        if self.audit_log is None:
            return
        try:
            self.audit_log.append(record)
        except (OSError, TpmSignerError) as exc:
            # The outcome is named here, so that this log keeps it when the audit log cannot.
            logger.error(
                "the audit record of request #%s (outcome %s) was not written: %s",
                record.get("request_id"),
                record.get("outcome"),
                exc,
            )

    def notify(self, approval: ApprovalRequest, reply: Message) -> None:
        """Start a desktop notification of a request's outcome, if notifications are on."""
        if self.notifier is None:
            return
        if isinstance(reply, SignReply):
            self.notifier.signed(approval)
        elif isinstance(reply, Failure):
            self.notifier.refused(approval, reply.message)

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with port 0)."""
        assert self._server is not None, "start() has not been called"
        return self._server.sockets[0].getsockname()[1]

    async def bind(self) -> None:
        """Bind and listen on the configured address, but accept no connection yet.

        Raises OSError if the address is in use.  ``tpmsigner serve`` binds
        before it touches the TPM, so that a second serve on a busy port
        stops before its stale-handle flush can remove the running serve's
        storage key and session.  Connections that arrive before start()
        wait in the listen backlog.  Calling it again does nothing.
        """
        if self._server is not None:
            return
        server = await asyncio.start_server(
            self._accept, self.config.host, self.config.port, backlog=LISTEN_BACKLOG, start_serving=False
        )
        # With SO_REUSEADDR, which asyncio sets, Linux lets two sockets bind
        # one port as long as neither listens yet.  Listening at once makes a
        # second serve that starts at the same moment fail here too.  The
        # listen goes through a duplicate descriptor, because asyncio's
        # socket wrappers do not offer listen().
        try:
            for transport_socket in server.sockets:
                with socket.fromfd(transport_socket.fileno(), transport_socket.family, transport_socket.type) as listener:
                    listener.listen(LISTEN_BACKLOG)
        except OSError:
            server.close()
            raise
        self._server = server

    async def start(self) -> None:
        """Bind the address unless bind() did, and start accepting connections."""
        await self.bind()
        assert self._server is not None
        await self._server.start_serving()
        self._revocation_task = asyncio.create_task(self._watch_revocations())
        logger.info(
            "signer listening on %s port %d, Noise key %s",
            self.config.host,
            self.port,
            channel.public_key_fingerprint(self.static_key.public),
        )

    async def close(self) -> None:
        started = self._revocation_task is not None
        if self._server is not None:
            self._server.close()
        if self._revocation_task is not None:
            self._revocation_task.cancel()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=5.0)
        if self._server is not None:
            await self._server.wait_closed()
        if self.notifier is not None:
            await self.notifier.close()
        if started:
            logger.info("signer stopped")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = writer.get_extra_info("peername")
        address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        host = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        try:
            await self._serve_connection(reader, writer, address, host)
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str, host: str
    ) -> None:
        trusted: dict[bytes, Device] = {}

        def is_trusted(public_key: bytes) -> bool:
            device = self.devices.find(public_key)
            if device is not None:
                trusted[public_key] = device
            return device is not None

        rejection = self._admission.admit(host)
        if rejection is not None:
            self._admission_log.warning("connection from %s closed before the handshake: %s", address, rejection)
            return
        try:
            secure = await channel.respond(reader, writer, self.static_key, is_trusted)
        except PeerNotTrustedError as exc:
            self._handshake_log.warning("connection from %s rejected: %s (allow it with 'tpmsigner allow')", address, exc)
            return
        except ChannelError as exc:
            self._handshake_log.warning("connection from %s failed during the handshake: %s", address, exc)
            return
        except ConfigError as exc:
            # is_trusted could not read devices.json, so no device is trusted until it is fixed.
            self._devices_file_log.error("%s; closing the connection from %s", exc, address)
            return
        finally:
            self._admission.finish(host)

        device = trusted[secure.remote_static]
        open_connections = sum(1 for session in self._sessions if session.secure.remote_static == secure.remote_static)
        if open_connections >= MAX_CONNECTIONS_PER_DEVICE:
            self._device_limit_log.warning(
                "device %r already has %d connections; closing the new one from %s",
                device.name,
                open_connections,
                address,
            )
            await _reject_connection(
                secure, f"device {device.name!r} already has {MAX_CONNECTIONS_PER_DEVICE} connections to this signer"
            )
            return
        logger.info("device %r connected from %s", device.name, address)
        session = _AgentSession(self, secure, device, address)
        self._sessions.add(session)
        self.note_device_seen(device, address)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)
        logger.info("device %r at %s disconnected", device.name, address)


    async def _watch_revocations(self) -> None:
        """Close idle connections of revoked devices within about REVOCATION_CHECK_INTERVAL.

        A connection with a request in flight is also caught by the check
        that each request makes; this covers connections that send nothing.
        """
        while True:
            await asyncio.sleep(REVOCATION_CHECK_INTERVAL)
            try:
                self._close_revoked_sessions()
            except Exception:  # noqa: BLE001 - the watch must outlive one bad check
                logger.exception("checking for revoked devices failed")

    def _close_revoked_sessions(self) -> None:
        if not self._sessions:
            self._devices_file_state = None
            return
        # The file is replaced atomically on every change, so its inode,
        # modification time and size change too; re-reading it every
        # second otherwise would be wasted work.
        try:
            info = self.devices.path.stat()
            state = (info.st_ino, info.st_mtime_ns, info.st_size)
        except FileNotFoundError:
            state = None
        if state is not None and state == self._devices_file_state:
            return
        self._devices_file_state = state
        try:
            allowed = {device.public_key for device in self.devices.load()}
        except ConfigError as exc:
            logger.error("cannot read the trusted devices: %s; closing every connection", exc)
            allowed = set()
        for session in list(self._sessions):
            if session.secure.remote_static not in allowed:
                logger.warning(
                    "device %r at %s is no longer allowed; closing its connection", session.device.name, session.address
                )
                self._sessions.discard(session)
                asyncio.create_task(session.secure.close())

    def note_device_seen(self, device: Device, address: str) -> None:
        """Record ``address`` and the time as the device's last contact, at most once per LAST_SEEN_INTERVAL."""
        now = asyncio.get_running_loop().time()
        last = self._last_seen_written.get(device.public_key)
        if last is not None and now - last < LAST_SEEN_INTERVAL:
            return
        self._last_seen_written[device.public_key] = now
        try:
            self.devices.record_seen(device.public_key, address)
        except (ConfigError, OSError) as exc:
            logger.error("device %r: cannot record its last contact in %s: %s", device.name, self.devices.path, exc)


class _AgentSession:
    """One authenticated agent connection."""

    def __init__(self, server: SignerServer, secure: channel.NoiseChannel, device: Device, address: str) -> None:
        self.server = server
        self.secure = secure
        self.device = device
        self.address = address
        self._pending: set[asyncio.Task[None]] = set()
        self._pending_signs = 0

    async def run(self) -> None:
        try:
            while True:
                try:
                    payload = await self.secure.receive()
                except ChannelClosedError as exc:
                    # An agent that stops or reconnects closes between messages.
                    logger.info("device %r: channel closed: %s", self.device.name, exc)
                    return
                except ChannelError as exc:
                    logger.warning("device %r: channel closed: %s", self.device.name, exc)
                    return
                if not self._still_allowed():
                    return
                self.server.note_device_seen(self.device, self.address)
                await self._dispatch(payload)
        finally:
            for task in self._pending:
                task.cancel()
            if self._pending:
                await asyncio.wait(self._pending, timeout=5.0)
            await self.secure.close()

    def _still_allowed(self) -> bool:
        """Re-read the device list, so a removed or replaced key stops working at once."""
        try:
            device = self.server.devices.find(self.secure.remote_static)
        except ConfigError as exc:
            logger.error("device %r: cannot read the trusted devices: %s; closing the connection", self.device.name, exc)
            return False
        if device is None:
            logger.warning("device %r is no longer allowed; closing its connection", self.device.name)
            return False
        self.device = device
        return True

    async def _dispatch(self, payload: bytes) -> None:
        try:
            message = decode_message(payload)
        except ProtocolError as exc:
            logger.warning("device %r sent a malformed message (%d bytes): %s", self.device.name, len(payload), exc)
            request_id = request_id_of(payload)
            if request_id is not None:
                await self._reply(Failure(request_id, FailureCode.BAD_REQUEST, str(exc)))
            return

        # Listings return at once, so only sign requests, which may wait for
        # a person, count toward the limit.
        if isinstance(message, SignRequest) and self._pending_signs >= MAX_PENDING_PER_CONNECTION:
            logger.warning(
                "device %r has %d sign requests pending; rejecting request id %d",
                self.device.name,
                self._pending_signs,
                message.request_id,
            )
            await self._reply(
                Failure(message.request_id, FailureCode.BUSY, f"more than {MAX_PENDING_PER_CONNECTION} requests pending")
            )
            return

        # Counted here, not when the task starts, so a burst of requests
        # read before any task runs cannot pass the limit.
        if isinstance(message, SignRequest):
            self._pending_signs += 1
        task = asyncio.create_task(self._handle(message))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _handle(self, message: Message) -> None:
        try:
            if isinstance(message, ListRequest):
                reply = self._list(message)
            elif isinstance(message, SignRequest):
                try:
                    reply = await self._sign(message)
                finally:
                    self._pending_signs -= 1
            else:
                reply = Failure(message.request_id, FailureCode.BAD_REQUEST, f"{type(message).__name__} is not a request")
        except Exception:  # noqa: BLE001 - a bug must cost one request, not the connection
            logger.exception("device %r: request id %d failed with an unexpected error", self.device.name, message.request_id)
            reply = Failure(message.request_id, FailureCode.INTERNAL_ERROR, "internal error on the signer; see its log")
        await self._reply(reply)

    async def _reply(self, message: Message) -> None:
        payload = encode_message(message)
        if len(payload) > channel.MAX_PAYLOAD:
            # A listing of several thousand identities is the only reply
            # that can grow this large.
            logger.error(
                "device %r: reply to request id %d is %d bytes, over the %d-byte message limit",
                self.device.name,
                message.request_id,
                len(payload),
                channel.MAX_PAYLOAD,
            )
            payload = encode_message(
                Failure(message.request_id, FailureCode.INTERNAL_ERROR, "the reply is too large for one message")
            )
        try:
            await self.secure.send(payload)
        except ChannelError as exc:
            logger.info("device %r: reply to request id %d not delivered: %s", self.device.name, message.request_id, exc)

    def _list(self, request: ListRequest) -> Message:
        try:
            identities = [identity for identity in self.server.store.list() if identity.enabled]
        except KeyStoreError as exc:
            logger.error("listing identities failed: %s", exc)
            return Failure(request.request_id, FailureCode.INTERNAL_ERROR, "the signer cannot read its key store")
        if len(identities) > MAX_LISTED_IDENTITIES:
            self.server.listing_limit_log.warning(
                "the key store has %d enabled identities; listings show only the first %d by label "
                "(disable unused ones with 'tpmsigner disable LABEL')",
                len(identities),
                MAX_LISTED_IDENTITIES,
            )
            identities = identities[:MAX_LISTED_IDENTITIES]
        # An identity with a certificate is listed twice, key first, as
        # OpenSSH's ssh-agent lists a key and its certificate.
        return ListReply(
            request.request_id,
            tuple(
                ListedIdentity(blob, identity.label) for identity in identities for blob in identity.agent_key_blobs()
            ),
        )

    async def _sign(self, request: SignRequest) -> Message:
        """Handle a sign request and record its outcome in the signer's audit log."""
        serial = self.server.next_serial()
        record: dict[str, object] = {
            "request_id": serial,
            "device": self.device.name,
            "address": self.address,
            "process": request.process.describe(),
            "key_fingerprint": fingerprint_of_blob(request.key_blob),
        }
        started = time.monotonic()
        reply = await self._sign_checked(request, serial, record)
        if isinstance(reply, SignReply):
            record.update(outcome="approved", reason="")
        else:
            assert isinstance(reply, Failure)
            record.update(outcome=outcome_for_failure(reply.code), reason=reply.message)
        record["latency_ms"] = round((time.monotonic() - started) * 1000)
        self.server.audit(record)
        return reply

    async def _sign_checked(self, request: SignRequest, serial: int, record: dict[str, object]) -> Message:
        request_id = request.request_id
        device = self.device.name
        try:
            identity = self.server.store.find_by_public_key(request.key_blob)
        except IdentityNotFoundError:
            logger.warning("request #%d from device %r names a key this signer does not hold", serial, device)
            return Failure(request_id, FailureCode.UNKNOWN_KEY, "no such key on this signer")
        except KeyStoreError as exc:
            logger.error("request #%d: reading the key store failed: %s", serial, exc)
            return Failure(request_id, FailureCode.INTERNAL_ERROR, "the signer cannot read its key store")

        record["key_label"] = identity.label
        if not identity.enabled:
            logger.warning("request #%d from device %r names disabled key %r: rejected", serial, device, identity.label)
            return Failure(request_id, FailureCode.KEY_DISABLED, f"key {identity.label!r} is disabled")

        # The signer reads the purpose from the data itself rather than
        # trusting the agent, so a compromised agent cannot disguise a request.
        # It is read first, so that every rejection below is audited with it.
        info = describe_signed_data(request.data, request.key_blob)
        record["purpose"] = info.purpose
        try:
            destination = check_destination(info, request.evidence)
            certificate = certificate_in_use(identity, request.key_blob, info)
        except (DestinationError, CertificateError) as exc:
            logger.warning("request #%d from device %r: %s; rejected", serial, device, exc)
            return Failure(request_id, FailureCode.BAD_REQUEST, str(exc))
        record["destination"] = {
            "user": info.user,
            "host": destination.text.rpartition("@")[2] if destination.text else None,
            "host_key_fingerprint": destination.host_key_fingerprint or None,
            "verified": destination.verified,
            "forwarded": destination.forwarded,
        }
        if certificate is not None:
            record["certificate"] = {"key_id": certificate.key_id, "serial": certificate.serial}

        # A device whose requests keep being refused is not allowed to
        # keep the prompts coming (tpmsigner/signer/refusals.py).
        paused = self._refusal_pause(request_id, serial)
        if paused is not None:
            return paused

        # No approver is asked for a PIN that the TPM would not check, because
        # during a lockout it rejects every PIN and an unreachable TPM signs nothing.
        refusal = await self._check_tpm_ready(request_id, serial, identity)
        if refusal is not None:
            return refusal

        if identity.allowed_host_keys and destination.host_key_fingerprint not in identity.allowed_host_keys:
            # Only a login whose binding the signer verified itself can name
            # a host key, so an agent cannot talk its way past this.
            logger.warning(
                "request #%d from device %r: key %r may only log in to the host keys listed with "
                "'tpmsigner restrict' (%d), not %s; rejected",
                serial,
                device,
                identity.label,
                len(identity.allowed_host_keys),
                destination.host_key_fingerprint or "an unbound session",
            )
            return Failure(request_id, FailureCode.DENIED, f"key {identity.label!r} is restricted to other hosts")

        approval = ApprovalRequest(
            request_id=serial,
            key_label=identity.label,
            key_fingerprint=identity.fingerprint,
            device=device,
            process=request.process,
            purpose=info.purpose,
            destination=destination.text,
            destination_verified=destination.verified,
            host_key_fingerprint=destination.host_key_fingerprint,
            forwarded=destination.forwarded,
            certificate_key_id=None if certificate is None else certificate.key_id,
            certificate_status="" if certificate is None else certificate.validity(time.time()),
        )
        logger.info(
            "request #%d from device %r (%s): sign with %r %s%s for %s%s: asking for approval",
            serial,
            device,
            approval.process.describe(),
            identity.label,
            identity.fingerprint,
            "" if certificate is None else f" (certificate {certificate.key_id!r})",
            info.purpose,
            f" to {approval.destination}" if approval.destination else "",
        )

        pin = await self._ask_unless_busy(approval)
        if isinstance(pin, Failure):
            self._count_refusal(pin)
            self.server.notify(approval, pin)
            return Failure(request_id, pin.code, pin.message)
        self.server.refusals.approved(self.device.public_key)
        reply = await self._sign_in_tpm(request, serial, identity, pin)
        self.server.notify(approval, reply)
        return reply

    def _refusal_pause(self, request_id: int, serial: int) -> Failure | None:
        """Refuse without a prompt while the device is paused after refusals in a row."""
        refusals = self.server.refusals
        remaining = refusals.remaining_pause(self.device.public_key)
        if remaining <= 0:
            return None
        message = (
            f"device {self.device.name!r} was refused {refusals.refusals_in_a_row(self.device.public_key)} "
            f"times in a row; its requests are paused for {math.ceil(remaining)} s more"
        )
        logger.warning("request #%d: %s; rejected without asking", serial, message)
        return Failure(request_id, FailureCode.DENIED, message)

    def _count_refusal(self, failure: Failure) -> None:
        if failure.code not in (FailureCode.DENIED, FailureCode.TIMED_OUT):
            return
        pause = self.server.refusals.refused(self.device.public_key)
        if pause > 0:
            logger.warning(
                "device %r was refused %d times in a row; refusing its requests without asking for %g s",
                self.device.name,
                self.server.refusals.refusals_in_a_row(self.device.public_key),
                pause,
            )

    async def _check_tpm_ready(self, request_id: int, serial: int, identity: Identity) -> Failure | None:
        """Reconnect and load the key's storage parent if needed; return a Failure if no PIN should be asked."""
        worker = self.server.worker
        try:
            status = await worker.call(_check_ready_for, worker.tpm, self.server.store, identity)
        except TpmError as exc:
            logger.error("request #%d: %s; not asking for a PIN", serial, exc)
            return Failure(request_id, FailureCode.TPM_ERROR, "the signer's TPM is not ready; see the signer's log")
        except KeyStoreError as exc:
            logger.error("request #%d: key %r: %s", serial, identity.label, exc)
            return Failure(request_id, FailureCode.INTERNAL_ERROR, "the signer cannot read its key store")
        if status.in_lockout:
            logger.error(
                "request #%d: the TPM is in dictionary-attack lockout; not asking for a PIN. The next try "
                "is allowed within %d s, or clear it with tpm2_dictionarylockout --clear-lockout",
                serial,
                status.interval,
            )
            return Failure(request_id, FailureCode.LOCKED_OUT, "the signer's TPM is in dictionary-attack lockout")
        return None

    async def _ask_unless_busy(self, approval: ApprovalRequest) -> str | Failure:
        """Ask the approver, unless MAX_WAITING_APPROVALS requests already wait for it."""
        server = self.server
        if server.waiting_approvals >= MAX_WAITING_APPROVALS:
            logger.warning(
                "request #%d: %d sign requests are already waiting for approval; rejected as busy",
                approval.request_id,
                server.waiting_approvals,
            )
            return Failure(
                approval.request_id,
                FailureCode.BUSY,
                f"{MAX_WAITING_APPROVALS} sign requests are already waiting for approval on the signer",
            )
        server.waiting_approvals += 1
        try:
            return await self._ask(approval)
        finally:
            server.waiting_approvals -= 1

    async def _ask(self, approval: ApprovalRequest) -> str | Failure:
        """Return the PIN, or a Failure (its request id is the serial, for the caller to replace)."""
        request_id = approval.request_id
        timeout = self.server.config.approval_timeout
        try:
            pin = await asyncio.wait_for(self.server.approver.request_pin(approval), timeout)
        except asyncio.TimeoutError:
            logger.info("request #%d: no approval within %g s: denied", request_id, timeout)
            return Failure(request_id, FailureCode.TIMED_OUT, f"no approval within {timeout:g} s")
        except Exception:  # noqa: BLE001 - an approver bug must refuse, not crash the signer
            logger.exception("request #%d: the approver failed: denied", request_id)
            return Failure(request_id, FailureCode.DENIED, "the approver failed")

        if not pin:
            logger.info("request #%d: denied by the approver", request_id)
            return Failure(request_id, FailureCode.DENIED, "refused on the signer")
        return pin

    async def _sign_in_tpm(self, request: SignRequest, serial: int, identity: Identity, pin: str) -> Message:
        request_id = request.request_id
        worker = self.server.worker
        try:
            signature = await worker.call(
                sign_data, worker.tpm, self.server.store, identity, request.data, pin.encode("utf-8"), request.flags
            )
        except TpmAuthError as exc:
            logger.warning("request #%d: key %r: %s", serial, identity.label, exc)
            return Failure(request_id, FailureCode.WRONG_PIN, "wrong PIN")
        except TpmLockoutError as exc:
            logger.error("request #%d: %s", serial, exc)
            return Failure(request_id, FailureCode.LOCKED_OUT, "the TPM is in dictionary-attack lockout")
        except TpmKeyLoadError as exc:
            logger.error("request #%d: key %r: %s", serial, identity.label, exc)
            return Failure(request_id, FailureCode.TPM_ERROR, "the key does not load on the signer's TPM")
        except UnsupportedByTpmError as exc:
            logger.error("request #%d: key %r: %s", serial, identity.label, exc)
            return Failure(request_id, FailureCode.UNSUPPORTED, str(exc))
        except TpmUnavailableError as exc:
            # The TPM may have seen the PIN already, so it is never sent again:
            # a retry could count a wrong PIN twice or sign twice.
            logger.error("request #%d: %s; this request fails and its PIN is not sent again", serial, exc)
            return Failure(
                request_id, FailureCode.TPM_ERROR, "the signer lost its TPM while signing; see the signer's log"
            )
        except (TpmError, KeyStoreError) as exc:
            logger.error("request #%d: %s", serial, exc)
            return Failure(request_id, FailureCode.TPM_ERROR, "the signer's TPM failed; see the signer's log")

        logger.info("request #%d: signed with %r", serial, identity.label)
        try:
            self.server.last_use.record(identity)
        except (KeyStoreError, OSError) as exc:
            logger.warning("request #%d: could not record the last use of %r: %s", serial, identity.label, exc)
        return SignReply(request_id, signature)


def _check_ready_for(tpm: Tpm, store: KeyStore, identity: Identity) -> LockoutStatus:
    """Prepare ``tpm`` for a signature by ``identity``; runs on the TPM thread."""
    return tpm.check_ready(store.key_blob(identity).parent)


async def _reject_connection(secure: channel.NoiseChannel, reason: str) -> None:
    """Tell the agent why its new connection is not served, with a BUSY failure, and close it."""
    try:
        await secure.send(encode_message(Failure(CONNECTION_REQUEST_ID, FailureCode.BUSY, reason)))
    except ChannelError:
        pass
    await secure.close()
