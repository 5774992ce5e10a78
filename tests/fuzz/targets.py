"""Fuzz targets: one function per entry point that takes untrusted bytes.

Each target feeds its input to the product and raises only when the
product breaks its contract: an exception other than the module's narrow
error, a reply the protocol does not allow, a round trip that loses
information.  The narrow errors themselves are expected and ignored.

scripts/fuzz runs these under atheris (tests/fuzz/run.py), and
tests/test_fuzz_harnesses.py runs each on its seeds without atheris, so
the harnesses keep working as the product changes.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import logging
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from asyncssh.packet import Boolean, Byte, MPInt, String, UInt32
from tpm2_pytss.constants import TPM2_ECC
from tpm2_pytss.types import TPM2B_PRIVATE, TPM2B_PUBLIC

from tpmsigner import pairing
from tpmsigner.audit import AuditLog, print_audit
from tpmsigner.commands.signer import parse_listen
from tpmsigner.errors import ChannelError, ConfigError, KeyFileError, KeyStoreError, ProtocolError, TpmKeyLoadError
from tpmsigner.fsutil import read_secret_line
from tpmsigner.keyfile import encode_key_file, read_key_file
from tpmsigner.protocol import channel
from tpmsigner.protocol.messages import (
    Failure,
    FailureCode,
    ListedIdentity,
    ListReply,
    ListRequest,
    ProcessInfo,
    SignReply,
    SignRequest,
    decode_message,
    encode_message,
    request_id_of,
)
from tpmsigner.protocol.sessionbind import (
    BindingEvidence,
    SessionBind,
    decode_evidence,
    decode_session_bind,
    encode_evidence,
    encode_session_bind,
    verify_session_bind,
)
from tpmsigner.protocol.signeddata import PURPOSE_SSH_LOGIN, PURPOSE_UNKNOWN, SSHSIG_PURPOSE_PREFIX, describe_signed_data
from tpmsigner.protocol.sshkeys import fingerprint_of_blob, public_key_from_blob, verify_signature
from tpmsigner.signer.devices import DeviceRegistry
from tpmsigner.store import KeyStore, TpmBinding
from tpmsigner.templates import ecc_signing_key_template
from tpmsigner.tpm import PARENT_OWNER, TpmKeyBlob, public_key_of
from tpmsigner_agent import wire
from tpmsigner_agent.config import AgentHome, parse_address, parse_signer_address
from tpmsigner_agent.destination import SshTarget, parse_ssh_command, verified_host_name
from tpmsigner_agent.server import AgentServer

IO_TIMEOUT = 10.0


@dataclass
class Target:
    """One fuzz target: its entry function, seed inputs and libFuzzer's -max_len."""

    name: str
    run: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    max_len: int = 4096
    close: Callable[[], None] = field(default=lambda: None)


class HarnessFailure(AssertionError):
    """The product broke its contract on this input."""


def check(condition: bool, message: str) -> None:
    # An explicit check rather than assert, so it still runs under python -O.
    if not condition:
        raise HarnessFailure(message)


# ---- the signer protocol ----------------------------------------------------------

EVIDENCE = BindingEvidence(SessionBind(b"host key", b"session", b"signature", True), False, "host", True)
SIGNER_MESSAGES = [
    ListRequest(1),
    ListReply(2, (ListedIdentity(b"blob", "work"), ListedIdentity(b"", "ü"))),
    SignRequest(3, b"key", b"data", 2, ProcessInfo(42, 1000, "/usr/bin/ssh", "ssh host"), EVIDENCE),
    SignRequest(4, b"key", b"", 0),
    SignReply(5, b"signature"),
    Failure(6, FailureCode.DENIED, "refused"),
]


def run_signer_message(data: bytes) -> None:
    request_id = request_id_of(data)
    check(request_id is None or 0 <= request_id < 2**32, f"request id {request_id} out of range")
    try:
        message = decode_message(data)
    except ProtocolError:
        return
    check(request_id == message.request_id, "request_id_of disagrees with decode_message")
    check(decode_message(encode_message(message)) == message, "message does not round-trip")


# ---- ssh-agent messages and session binding ---------------------------------------


def run_agent_wire(data: bytes) -> None:
    for decode, encode in (
        (wire.decode_sign_request, lambda value: wire.encode_sign_request(value)[1:]),
        (wire.decode_identities_answer, lambda value: wire.encode_identities_answer(value)[1:]),
        (wire.decode_extension, lambda value: String(value[0]) + value[1]),
    ):
        try:
            value = decode(data)
        except ProtocolError:
            continue
        check(encode(value) == data, f"{decode.__name__} does not round-trip")

    try:
        bind = decode_session_bind(data)
    except ProtocolError:
        pass
    else:
        # RFC 4251 section 5 reads any non-zero boolean byte as TRUE, so the
        # encoding is canonical only after one round.
        check(decode_session_bind(encode_session_bind(bind)) == bind, "session-bind does not round-trip")
        check(isinstance(verify_session_bind(bind), bool), "verify_session_bind returned a non-bool")
    try:
        evidence = decode_evidence(data)
    except ProtocolError:
        return
    if evidence is not None:
        check(decode_evidence(encode_evidence(evidence)[4:]) == evidence, "evidence does not round-trip")


def agent_wire_seeds() -> list[bytes]:
    return [
        wire.encode_sign_request(wire.SignRequest(b"key", b"data", 2))[1:],
        wire.encode_identities_answer([(b"blob", "work")])[1:],
        String("session-bind@openssh.com") + String(b"host key") + String(b"sid") + String(b"sig") + Boolean(False),
        encode_session_bind(EVIDENCE.bind),
        encode_evidence(EVIDENCE)[4:],
    ]


def run_signed_data(data: bytes) -> None:
    # The first byte picks how much of the input is the key blob, so the
    # fuzzer can make the userauth request name the same key.
    split = data[0] if data else 0
    key_blob, signed = data[1 : 1 + split], data[1 + split :]
    info = describe_signed_data(signed, key_blob)
    check(
        info.purpose in (PURPOSE_SSH_LOGIN, PURPOSE_UNKNOWN) or info.purpose.startswith(SSHSIG_PURPOSE_PREFIX),
        f"unexpected purpose {info.purpose!r}",
    )
    check(isinstance(info.destination, str), "destination is not text")


# RFC 4252 section 7 in OpenSSH's hostbound form, and PROTOCOL.sshsig.
USERAUTH_KEY = b"k" * 8
USERAUTH_REQUEST = (
    String(b"s" * 32) + Byte(50) + String("alice") + String("ssh-connection")
    + String("publickey-hostbound-v00@openssh.com") + Boolean(True) + String("ssh-ed25519")
    + String(USERAUTH_KEY) + String(b"host key")
)
SSHSIG_DATA = b"SSHSIG" + String("file") + String(b"") + String("sha512") + String(b"h" * 64)


def signed_data_seeds() -> list[bytes]:
    return [bytes([len(USERAUTH_KEY)]) + USERAUTH_KEY + USERAUTH_REQUEST, b"\x00" + SSHSIG_DATA]


def run_ssh_key(data: bytes) -> None:
    try:
        key = public_key_from_blob(data)
    except ProtocolError:
        return
    check(public_key_from_blob(key.blob) == key, "key blob does not round-trip")
    check(key.openssh_line("c").startswith(key.key_type), "openssh_line lost the key type")
    check(verify_signature(key, b"data", data) is False, "a key blob verified as its own signature")


# The base point G of NIST P-256 (FIPS 186-4 section D.1.2.3), a valid public key.
P256_GENERATOR = bytes.fromhex(
    "04"
    "6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296"
    "4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5"
)
P256_KEY_BLOB = String("ecdsa-sha2-nistp256") + String("nistp256") + String(P256_GENERATOR)


def ssh_key_seeds() -> list[bytes]:
    return [P256_KEY_BLOB, String("ssh-rsa") + MPInt(65537) + MPInt(2**2047 + 1)]


def run_pairing_message(data: bytes) -> None:
    try:
        message = pairing.decode(data)
    except ProtocolError:
        return
    check(pairing.encode(message) == data, "pairing message does not round-trip")


# ---- the Noise channel -------------------------------------------------------------

AGENT_KEY = channel.StaticKey(bytes(range(1, 33)), b"")
SIGNER_KEY = channel.StaticKey(bytes(range(33, 65)), b"")


def _handshake():
    agent = channel._new_connection(AGENT_KEY, initiator=True)
    signer = channel._new_connection(SIGNER_KEY, initiator=False)
    signer.read_message(agent.write_message())
    agent.read_message(signer.write_message())
    signer.read_message(agent.write_message())
    return agent, signer


def _plaintexts(data: bytes) -> list[bytes]:
    """Split the input into plaintexts, each prefixed by a one-byte length."""
    plaintexts = []
    while data:
        length, data = data[0], data[1:]
        plaintexts.append(data[:length])
        data = data[length:]
    return plaintexts


async def _receive_until_error(signer, stream: bytes) -> list[bytes | ChannelError]:
    reader = asyncio.StreamReader()
    reader.feed_data(stream)
    reader.feed_eof()
    # receive() never writes, so the channel needs no writer.
    secure = channel.NoiseChannel(signer, AGENT_KEY.public, reader, None)
    outcomes: list[bytes | ChannelError] = []
    while True:
        try:
            outcomes.append(await asyncio.wait_for(secure.receive(), IO_TIMEOUT))
        except ChannelError as exc:
            return outcomes + [exc]


def run_channel(data: bytes) -> None:
    # The first byte chooses: encrypt the plaintexts (odd), or send the
    # rest as raw frames (even).
    agent, signer = _handshake()
    if data and data[0] & 1:
        plaintexts = _plaintexts(data[1:])
        stream = b"".join(
            struct.pack(">H", len(ciphertext)) + ciphertext
            for ciphertext in (bytes(agent.encrypt(plaintext)) for plaintext in plaintexts)
        )
    else:
        plaintexts = None
        stream = data[1:]
    outcomes = asyncio.run(_receive_until_error(signer, stream))

    check(isinstance(outcomes[-1], ChannelError), "receive() ended without ChannelError")
    if plaintexts is None:
        check(len(outcomes) == 1, "raw bytes decrypted to a message")
        return
    expected: list[bytes] = []
    message = b""
    for plaintext in plaintexts:
        if not plaintext or plaintext[0] > 1:
            break
        message += plaintext[1:]
        if plaintext[0] == 0:
            expected.append(message)
            message = b""
    check(outcomes[:-1] == expected, f"reassembled {outcomes[:-1]!r}, sent {expected!r}")


def channel_seeds() -> list[bytes]:
    return [b"\x01\x04\x01abc\x04\x00def", b"\x01\x01\x00\x02\x07x", b"\x00\x00\x05hello"]


def run_handshake(data: bytes) -> None:
    """Feed the input as the initiator's handshake frames to respond()."""

    async def respond() -> None:
        left, right = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=left)
        try:
            right.sendall(data)
            right.shutdown(socket.SHUT_WR)
            try:
                await channel.respond(reader, writer, SIGNER_KEY, lambda remote: False, timeout=IO_TIMEOUT)
            except ChannelError:
                return
            raise HarnessFailure("respond() accepted a peer that is_trusted rejects")
        finally:
            writer.close()
            right.close()

    asyncio.run(respond())


def handshake_seeds() -> list[bytes]:
    agent = channel._new_connection(AGENT_KEY, initiator=True)
    first = bytes(agent.write_message())
    return [struct.pack(">H", len(first)) + first, struct.pack(">H", 32) + bytes(32) + struct.pack(">H", 48) + bytes(48)]


# ---- files -----------------------------------------------------------------------------

_scratch = Path(tempfile.mkdtemp(prefix="tpmsigner-fuzz-"))
atexit.register(shutil.rmtree, _scratch, ignore_errors=True)


def run_key_file(data: bytes) -> None:
    # With an odd first byte, the rest is DER that the harness armours, so
    # mutations reach the ASN.1 and TPM structures instead of breaking base64.
    if data and data[0] & 1:
        data = b"-----BEGIN TSS2 PRIVATE KEY-----\n" + base64.encodebytes(data[1:]) + b"-----END TSS2 PRIVATE KEY-----\n"
    try:
        key_file = read_key_file(data)
        key = public_key_of(key_file.blob)
    except (KeyFileError, TpmKeyLoadError):
        return
    check(public_key_from_blob(key.blob) == key, "the key file's public key does not round-trip")


def key_file_seeds() -> list[bytes]:
    template = ecc_signing_key_template(TPM2_ECC.NIST_P256)
    template.unique.ecc.x = P256_GENERATOR[1:33]
    template.unique.ecc.y = P256_GENERATOR[33:]
    public = bytes(TPM2B_PUBLIC(publicArea=template).marshal())
    private = bytes(TPM2B_PRIVATE(b"p" * 32).marshal())
    pem = encode_key_file(TpmKeyBlob(public, private, PARENT_OWNER))
    der = base64.b64decode(b"".join(pem.splitlines()[1:-1]))
    return [b"\x00" + pem, b"\x01" + der]


STATE_FILES = ["keys/work.json", "tpm.json", "devices.json", "signers.json", "noise-static-key.pem", "pin"]


def run_state_file(data: bytes) -> None:
    """Write the input as one state file, chosen by its first byte, and read it back."""
    if not data:
        return
    name = STATE_FILES[data[0] % len(STATE_FILES)]
    content = data[1:]
    if name == "noise-static-key.pem" and data[0] & 0x80:
        # The rest is DER, armoured here so that mutations reach the key's ASN.1.
        content = b"-----BEGIN PRIVATE KEY-----\n" + base64.encodebytes(content) + b"-----END PRIVATE KEY-----\n"
    path = _scratch / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    try:
        if name == "keys/work.json":
            for identity in KeyStore(_scratch).list():
                check(identity.openssh_line().endswith(" work"), "identity has the wrong comment")
        elif name == "tpm.json":
            TpmBinding(_scratch).recorded()
        elif name == "devices.json":
            DeviceRegistry(path).load()
        elif name == "signers.json":
            AgentHome(_scratch).signers()
        elif name == "noise-static-key.pem":
            channel.StaticKey.load_or_create(path)
        else:
            read_secret_line(path)
    except (KeyStoreError, ConfigError):
        pass
    finally:
        path.unlink(missing_ok=True)


def state_file_seeds() -> list[bytes]:
    key_text = channel.format_public_key(b"\x01" * 32)
    blob = P256_KEY_BLOB
    metadata = (
        '{"version": 1, "label": "work", "key_type": "ecdsa-p256", "public_key_blob": "%s", '
        '"fingerprint": "%s", "created": "2024-01-01T00:00:00+00:00", "enabled": true}'
        % (base64.b64encode(blob).decode(), fingerprint_of_blob(blob))
    )
    return [
        b"\x00" + metadata.encode(),
        b"\x01" + b'{"version": 1, "parents": {"0x81000001": "000b"}}',
        b"\x02" + ('{"version": 2, "devices": {"laptop": {"key": "%s"}}}' % key_text).encode(),
        b"\x03" + ('{"version": 1, "signers": {"s": {"address": "127.0.0.1:7810", "key": "%s"}}}' % key_text).encode(),
        b"\x04-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VuBCIEICC4TAgLhKYzGCoAbFlalwwyqzMqaa+8iyapNPAZcENN\n-----END PRIVATE KEY-----\n",
        b"\x88" + base64.b64decode("MC4CAQAwBQYDK2VuBCIEICC4TAgLhKYzGCoAbFlalwwyqzMqaa+8iyapNPAZcENN"),
        b"\x05" + b"1234\n",
    ]


def run_audit_log(data: bytes) -> None:
    path = _scratch / "audit.jsonl"
    path.write_bytes(data)
    log = AuditLog(path)
    try:
        result = log.verify()
        try:
            records = log.records()
        except ConfigError:
            check(not result.ok, "records() rejected a log that verify() accepted")
            return
        with open("/dev/null", "w") as sink, contextlib.redirect_stdout(sink):
            print_audit(records, since="2024-01-01T00:00")
    finally:
        path.unlink(missing_ok=True)


def audit_log_seeds() -> list[bytes]:
    line = b'{"outcome":"denied","prev":"' + b"0" * 64 + b'","time":"2024-05-01T10:00:00+00:00"}'
    return [line + b"\n", line + b"\n[1]\n", b'{"outcome":{"x":1},"time":"2024-05-01"}\n']


def run_ssh_command(data: bytes) -> None:
    text = data.decode("utf-8", errors="replace")
    target = parse_ssh_command(text.split("\0"), "/home/fuzz")
    check(target is None or target.port is None or 1 <= target.port <= 65535, "port out of range")
    for parse in (parse_address, parse_signer_address, parse_listen):
        try:
            host, port = parse(text)
        except ConfigError:
            continue
        check(0 <= port <= 65535, f"{parse.__name__} returned port {port}")


def ssh_command_seeds() -> list[bytes]:
    return [
        b"ssh\0-p\0002222\0-o\0UserKnownHostsFile=/tmp/kh\0user@host",
        b"ssh\0ssh://user@[::1]:22/",
        b"127.0.0.1:7810",
        b"[fe80::1%eth0]:22",
    ]


def run_known_hosts(data: bytes) -> None:
    path = _scratch / "known_hosts"
    path.write_bytes(data)
    try:
        for host, port in (("host", None), ("[host]", 2222), ("10.0.0.1", 22)):
            name, verified = verified_host_name(SshTarget(host, port, (str(path),)), b"\x00\x00\x00\x0bssh-ed25519" + String(b"k" * 32))
            check(name == host and isinstance(verified, bool), "verified_host_name changed the host name")
    finally:
        path.unlink(missing_ok=True)


def known_hosts_seeds() -> list[bytes]:
    key = base64.b64encode(String("ssh-ed25519") + String(b"k" * 32)).decode()
    return [
        f"host,10.0.0.1 ssh-ed25519 {key}\n@cert-authority *.example ssh-ed25519 {key}\n".encode(),
        f"|1|c2FsdHNhbHRzYWx0c2FsdHNhbHQ=|aGFzaGhhc2hoYXNoaGFzaGhhc2g= ssh-ed25519 {key}\n".encode(),
    ]


# ---- the agent on its socket ------------------------------------------------------------

AGENT_REPLY_TYPES = {5, 6, 12, 14, 28}


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


class _AgentSocket:
    """An AgentServer with no signers, on its own event loop thread; started on first use."""

    def __init__(self) -> None:
        self.path = _scratch / "agent.sock"
        self.errors = _ErrorLog()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.server: AgentServer | None = None
        self.previous_level = logging.NOTSET

    def ensure_started(self) -> None:
        if self.loop is not None:
            return
        logger = logging.getLogger("tpmsigner_agent")
        logger.addHandler(self.errors)
        # The agent logs a warning for every malformed request, and a fuzzer
        # makes millions of them.
        self.previous_level = logger.level
        logger.setLevel(logging.ERROR)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-agent", daemon=True)
        self.thread.start()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        sock.listen()

        async def start() -> AgentServer:
            server = AgentServer([], channel.StaticKey.generate())
            await server.start(sock)
            return server

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(IO_TIMEOUT)

    def close(self) -> None:
        if self.loop is None:
            return
        assert self.server is not None and self.thread is not None
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(IO_TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(IO_TIMEOUT)
        self.loop.close()
        self.loop = None
        logger = logging.getLogger("tpmsigner_agent")
        logger.removeHandler(self.errors)
        logger.setLevel(self.previous_level)
        self.path.unlink(missing_ok=True)


_agent_socket = _AgentSocket()


def _expected_replies(stream: bytes) -> int:
    count = offset = 0
    while offset + 4 <= len(stream):
        (length,) = struct.unpack(">I", stream[offset : offset + 4])
        if length == 0 or length > wire.MAX_MESSAGE_LENGTH:
            return count + 1
        if offset + 4 + length > len(stream):
            break
        count += 1
        offset += 4 + length
    return count


def run_agent_socket(data: bytes) -> None:
    _agent_socket.ensure_started()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(IO_TIMEOUT)
        client.connect(str(_agent_socket.path))
        try:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
        except BrokenPipeError:
            pass
        received = b""
        while chunk := client.recv(65536):
            received += chunk

    replies = 0
    while received:
        check(len(received) >= 5, f"a reply frame is cut short: {received[:16]!r}")
        (length,) = struct.unpack(">I", received[:4])
        check(0 < length <= len(received) - 4, "a reply frame is cut short")
        check(received[4] in AGENT_REPLY_TYPES, f"reply type {received[4]} is not an agent reply")
        received = received[4 + length :]
        replies += 1
    check(replies == _expected_replies(data), f"{replies} replies for {_expected_replies(data)} messages")
    check(not _agent_socket.errors.messages, f"the agent logged errors: {_agent_socket.errors.messages}")


def agent_socket_seeds() -> list[bytes]:
    bind = String("session-bind@openssh.com") + encode_session_bind(EVIDENCE.bind)
    return [
        wire.frame(Byte(11)),
        wire.frame(wire.encode_sign_request(wire.SignRequest(USERAUTH_KEY, USERAUTH_REQUEST, 0))),
        wire.frame(Byte(27) + String("query")) + wire.frame(Byte(27) + bind),
        UInt32(0) + Byte(11),
        wire.frame(Byte(200)) + UInt32(10) + b"part",
    ]


TARGETS = {
    target.name: target
    for target in [
        Target("signer-message", run_signer_message, lambda: [encode_message(message) for message in SIGNER_MESSAGES]),
        Target("agent-wire", run_agent_wire, agent_wire_seeds),
        Target("agent-socket", run_agent_socket, agent_socket_seeds, max_len=16384, close=_agent_socket.close),
        Target("signed-data", run_signed_data, signed_data_seeds),
        Target("ssh-key", run_ssh_key, ssh_key_seeds),
        Target("pairing-message", run_pairing_message, lambda: [pairing.encode(pairing.Hello("laptop")), pairing.encode(pairing.Confirm(True, ""))]),
        Target("channel", run_channel, channel_seeds),
        Target("handshake", run_handshake, handshake_seeds, max_len=512),
        Target("key-file", run_key_file, key_file_seeds),
        Target("state-file", run_state_file, state_file_seeds),
        Target("audit-log", run_audit_log, audit_log_seeds),
        Target("ssh-command", run_ssh_command, ssh_command_seeds),
        Target("known-hosts", run_known_hosts, known_hosts_seeds),
    ]
}
