"""Tests of tpmsigner.protocol.signeddata against built and captured data.

The built cases follow RFC 4252 section 7, OpenSSH PROTOCOL section 2.5
(publickey-hostbound-v00@openssh.com) and OpenSSH PROTOCOL.sshsig. The
captured cases record what ssh-keygen and ssh really send to an agent.
"""

import base64
import hashlib
import os
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.support import Sshd
from tpmsigner.protocol.signeddata import PURPOSE_SSH_LOGIN, PURPOSE_UNKNOWN, describe_signed_data
from tpmsigner.protocol.sshkeys import NISTP256, EcdsaPublicKey, encode_ecdsa_signature

TOOL_TIMEOUT_SECONDS = 30
AGENT_SOCKET_TIMEOUT_SECONDS = 10
SESSION_ID = bytes(range(32))
HOSTBOUND = "publickey-hostbound-v00@openssh.com"

# draft-miller-ssh-agent section 6.1, message numbers.
SSH_AGENT_FAILURE = 5
SSH_AGENTC_REQUEST_IDENTITIES = 11
SSH_AGENT_IDENTITIES_ANSWER = 12
SSH_AGENTC_SIGN_REQUEST = 13
SSH_AGENT_SIGN_RESPONSE = 14


def ssh_string(value: bytes | str) -> bytes:
    if isinstance(value, str):
        value = value.encode("utf-8")
    return struct.pack(">I", len(value)) + value


def userauth_request(
    key_blob: bytes,
    *,
    user: bytes | str = "alice",
    method: str = "publickey",
    has_signature: bytes = b"\x01",
    host_key: bytes | None = None,
) -> bytes:
    """Build the data a client signs for a userauth request, RFC 4252 section 7."""
    data = (
        ssh_string(SESSION_ID)
        + bytes([50])
        + ssh_string(user)
        + ssh_string("ssh-connection")
        + ssh_string(method)
        + has_signature
        + ssh_string("ecdsa-sha2-nistp256")
        + ssh_string(key_blob)
    )
    if host_key is not None:
        data += ssh_string(host_key)
    return data


def sshsig_data(namespace: str, message: bytes, hash_algorithm: str = "sha512") -> bytes:
    """Build SSHSIG signed data, OpenSSH PROTOCOL.sshsig: magic, then four strings."""
    digest = hashlib.new(hash_algorithm, message).digest()
    return b"SSHSIG" + ssh_string(namespace) + ssh_string(b"") + ssh_string(hash_algorithm) + ssh_string(digest)


def new_key() -> tuple[ec.EllipticCurvePrivateKey, EcdsaPublicKey]:
    private_key = ec.generate_private_key(ec.SECP256R1())
    numbers = private_key.public_key().public_numbers()
    return private_key, EcdsaPublicKey(NISTP256, numbers.x, numbers.y)


class RecordingAgent:
    """A minimal ssh-agent on a Unix socket with one ECDSA key.

    It lists the key, signs with cryptography, records the data of every
    sign request, and sends SSH_AGENT_FAILURE for any other message.
    """

    def __init__(self, socket_path: Path) -> None:
        self.private_key, self.public_key = new_key()
        self.signed_data: list[bytes] = []
        self.socket_path = socket_path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(socket_path))
        self._listener.listen()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        # shutdown() wakes the accept() that the serving thread is blocked in.
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=AGENT_SOCKET_TIMEOUT_SECONDS)
        assert not self._thread.is_alive()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(AGENT_SOCKET_TIMEOUT_SECONDS)
                self._serve_connection(connection)

    def _serve_connection(self, connection: socket.socket) -> None:
        while True:
            try:
                header = _receive_exactly(connection, 4)
                message = _receive_exactly(connection, struct.unpack(">I", header)[0])
            except (EOFError, OSError):
                return
            reply = self._reply_to(message)
            connection.sendall(struct.pack(">I", len(reply)) + reply)

    def _reply_to(self, message: bytes) -> bytes:
        if message[:1] == bytes([SSH_AGENTC_REQUEST_IDENTITIES]):
            blob = self.public_key.blob
            return bytes([SSH_AGENT_IDENTITIES_ANSWER]) + struct.pack(">I", 1) + ssh_string(blob) + ssh_string("rec")
        if message[:1] == bytes([SSH_AGENTC_SIGN_REQUEST]):
            key_length = struct.unpack(">I", message[1:5])[0]
            data_start = 5 + key_length
            data_length = struct.unpack(">I", message[data_start : data_start + 4])[0]
            data = message[data_start + 4 : data_start + 4 + data_length]
            self.signed_data.append(data)
            der = self.private_key.sign(data, ec.ECDSA(hashes.SHA256()))
            signature = encode_ecdsa_signature(self.public_key, *decode_dss_signature(der))
            return bytes([SSH_AGENT_SIGN_RESPONSE]) + ssh_string(signature)
        return bytes([SSH_AGENT_FAILURE])


def _receive_exactly(connection: socket.socket, length: int) -> bytes:
    chunks = b""
    while len(chunks) < length:
        chunk = connection.recv(length - len(chunks))
        if not chunk:
            raise EOFError("agent client closed the connection")
        chunks += chunk
    return chunks


@pytest.fixture
def recording_agent(short_tmp_path: Path):
    agent = RecordingAgent(short_tmp_path / "recording-agent.sock")
    yield agent
    agent.close()


def test_userauth_publickey_is_login() -> None:
    _, key = new_key()

    info = describe_signed_data(userauth_request(key.blob), key.blob)

    assert info.purpose == PURPOSE_SSH_LOGIN
    assert info.user == "alice"
    assert info.service == "ssh-connection"
    assert info.session_id == SESSION_ID
    assert info.host_key is None
    assert info.namespace is None
    assert info.destination == "alice@?"


def test_userauth_hostbound_has_host_key() -> None:
    _, key = new_key()
    host_key = b"host key blob"

    info = describe_signed_data(userauth_request(key.blob, method=HOSTBOUND, host_key=host_key), key.blob)

    assert info.purpose == PURPOSE_SSH_LOGIN
    assert info.host_key == host_key
    assert info.user == "alice"
    assert info.destination == "alice@?"


def test_userauth_utf8_user_name() -> None:
    _, key = new_key()

    info = describe_signed_data(userauth_request(key.blob, user="jörg"), key.blob)

    assert info.user == "jörg"
    assert info.destination == "jörg@?"


def test_userauth_any_nonzero_boolean_is_true() -> None:
    # RFC 4251 section 5: any non-zero boolean value is TRUE.
    _, key = new_key()

    info = describe_signed_data(userauth_request(key.blob, has_signature=b"\x02"), key.blob)

    assert info.purpose == PURPOSE_SSH_LOGIN


def _unknown_userauth_cases() -> dict[str, tuple[bytes, bytes]]:
    _, key = new_key()
    _, other = new_key()
    blob = key.blob
    valid = userauth_request(blob)
    return {
        "other key blob": (userauth_request(other.blob), blob),
        "trailing byte": (valid + b"\x00", blob),
        "truncated": (valid[:-1], blob),
        "password method": (userauth_request(blob, method="password"), blob),
        "boolean false": (userauth_request(blob, has_signature=b"\x00"), blob),
        "message 51": (valid[:36] + bytes([51]) + valid[37:], blob),
        "user not utf-8": (userauth_request(blob, user=b"\xff\xfe"), blob),
        "hostbound without host key": (userauth_request(blob, method=HOSTBOUND), blob),
        "publickey with host key": (userauth_request(blob, host_key=b"host key"), blob),
        "empty": (b"", blob),
        "garbage": (os.urandom(200), blob),
    }


UNKNOWN_USERAUTH_CASES = _unknown_userauth_cases()


@pytest.mark.parametrize(("data", "key_blob"), UNKNOWN_USERAUTH_CASES.values(), ids=UNKNOWN_USERAUTH_CASES.keys())
def test_malformed_userauth_is_unknown(data: bytes, key_blob: bytes) -> None:
    info = describe_signed_data(data, key_blob)

    assert info.purpose == PURPOSE_UNKNOWN
    assert info.user is None
    assert info.destination == ""


def test_sshsig_names_namespace() -> None:
    _, key = new_key()

    info = describe_signed_data(sshsig_data("git", b"commit"), key.blob)

    assert info.purpose == "sshsig:git"
    assert info.namespace == "git"
    assert info.hash_algorithm == "sha512"
    assert info.user is None
    assert info.destination == ""


def test_sshsig_sha256() -> None:
    _, key = new_key()

    info = describe_signed_data(sshsig_data("file", b"x", "sha256"), key.blob)

    assert info.purpose == "sshsig:file"
    assert info.hash_algorithm == "sha256"


def _unknown_sshsig_cases() -> dict[str, bytes]:
    valid = sshsig_data("git", b"commit")
    return {
        "empty namespace": sshsig_data("", b"commit"),
        "trailing byte": valid + b"\x00",
        "truncated": valid[:-1],
        "magic only": b"SSHSIG",
        "magic as string": ssh_string("SSHSIG") + valid[6:],
        "lowercase magic": b"sshsig" + valid[6:],
        "namespace not utf-8": b"SSHSIG" + ssh_string(b"\xff") + valid[6 + 7 :],
    }


UNKNOWN_SSHSIG_CASES = _unknown_sshsig_cases()


@pytest.mark.parametrize("data", UNKNOWN_SSHSIG_CASES.values(), ids=UNKNOWN_SSHSIG_CASES.keys())
def test_malformed_sshsig_is_unknown(data: bytes) -> None:
    _, key = new_key()

    info = describe_signed_data(data, key.blob)

    assert info.purpose == PURPOSE_UNKNOWN
    assert info.namespace is None
    assert info.destination == ""


def test_real_ssh_keygen_sign_is_sshsig(recording_agent: RecordingAgent, tmp_path: Path) -> None:
    public_key_file = tmp_path / "agent-key.pub"
    public_key_file.write_text(recording_agent.public_key.openssh_line("rec") + "\n")
    message_file = tmp_path / "message"
    message = b"tree 1234\nauthor someone\n\nsigned commit\n"
    message_file.write_bytes(message)

    result = subprocess.run(
        ["ssh-keygen", "-Y", "sign", "-f", str(public_key_file), "-n", "git", str(message_file)],
        env={**os.environ, "SSH_AUTH_SOCK": str(recording_agent.socket_path)},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=TOOL_TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, result.stderr
    assert len(recording_agent.signed_data) == 1
    data = recording_agent.signed_data[0]

    info = describe_signed_data(data, recording_agent.public_key.blob)

    assert data == sshsig_data("git", message)
    assert info.purpose == "sshsig:git"
    assert info.namespace == "git"
    assert info.hash_algorithm == "sha512"
    assert info.destination == ""


@pytest.mark.parametrize(
    ("pubkey_authentication", "expected_host_key"),
    [("host-bound", True), ("unbound", False)],
)
def test_real_ssh_login_is_login(
    recording_agent: RecordingAgent, sshd_factory, pubkey_authentication: str, expected_host_key: bool
) -> None:
    sshd: Sshd = sshd_factory(authorized_keys=[recording_agent.public_key.openssh_line("rec")])
    argv = sshd.ssh_command(
        recording_agent.socket_path,
        "true",
        extra_options=["-o", f"PubkeyAuthentication={pubkey_authentication}"],
    )

    result = subprocess.run(
        argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=TOOL_TIMEOUT_SECONDS
    )
    assert result.returncode == 0, result.stderr
    assert len(recording_agent.signed_data) == 1

    info = describe_signed_data(recording_agent.signed_data[0], recording_agent.public_key.blob)

    assert info.purpose == PURPOSE_SSH_LOGIN
    assert info.user == sshd.user
    assert info.service == "ssh-connection"
    assert info.destination == f"{sshd.user}@?"
    # The session id is the exchange hash: SHA-256, SHA-384 or SHA-512 by key exchange method.
    assert info.session_id is not None
    assert len(info.session_id) in (32, 48, 64)
    host_key_blob = base64.b64decode(sshd.host_public_key_line.split()[1])
    assert info.host_key == (host_key_blob if expected_host_key else None)
