"""The threat model of docs/SECURITY.md, row by row, against the real chain.

Each test names its row. Rows whose demonstration lives in another file
(lockout, key files on another TPM, disabled keys, restricted keys) are
listed in docs/SECURITY.md with the test that shows them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import asyncssh
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from tpm2_pytss.constants import TPM2_CC

from tpmsigner.errors import TpmKeyLoadError
from tpmsigner.keyfile import read_key_file
from tpmsigner.protocol import channel
from tpmsigner.protocol.messages import (
    Failure,
    FailureCode,
    ListReply,
    ListRequest,
    SignReply,
    SignRequest,
    decode_message,
    encode_message,
)
from tpmsigner.protocol.sshkeys import public_key_from_blob, verify_signature
from tpmsigner.tpm import Tpm
from tests.support import LOCALHOST, wait_until
from tests.support.chain import Chain
from tests.support.relay import RecordingRelay
from tests.support.sshsig import sign_and_check
from tests.support.tpm_relay import TpmRelay, command_code
from tests.test_lifecycle import tpmsigner_tsskey_create

PIN = "4711-threat-model-pin"
# A label that appears nowhere by chance, to search for in captures.
LABEL = "zebra-quartz-label"
REPLY_TIMEOUT = 30.0


def start_chain(chain: Chain, *signer_args: str) -> str:
    public_line = chain.keygen(LABEL, PIN)
    chain.pair()
    chain.start_signer(*signer_args)
    chain.start_agent()
    return public_line


def key_blob_of(public_line: str) -> bytes:
    return base64.b64decode(public_line.split()[1])


def private_blob(chain: Chain) -> bytes:
    return read_key_file((chain.signer_home / "keys" / f"{LABEL}.tss").read_bytes()).blob.private


def signer_public_key(chain: Chain) -> bytes:
    return channel.parse_public_key(chain.tpmsigner("id").stdout.strip())


def agent_static_key(chain: Chain) -> channel.StaticKey:
    return channel.StaticKey.load_or_create(chain.agent_home / "noise-static-key.pem")


async def exchange(chain: Chain, static: channel.StaticKey, requests: list) -> list:
    """Open a Noise channel to the signer as ``static``, send ``requests`` one by one, return the replies."""
    reader, writer = await asyncio.open_connection(LOCALHOST, chain.signer_port)
    secure = await channel.initiate(reader, writer, static, signer_public_key(chain))
    replies = []
    try:
        for request in requests:
            await secure.send(encode_message(request))
            replies.append(decode_message(await asyncio.wait_for(secure.receive(), REPLY_TIMEOUT)))
    finally:
        await secure.close()
    return replies


def sign_through_agent(chain: Chain, public_line: str, data: bytes) -> bytes:
    """Ask the agent for a signature as an asyncssh client; raise ValueError on refusal."""

    async def sign() -> bytes:
        async with asyncssh.connect_agent(str(chain.agent_socket)) as agent:
            key = asyncssh.import_public_key(public_line)
            keypair = asyncssh.agent.SSHAgentKeyPair(agent, key.algorithm, key.public_data, b"")
            return await keypair.sign_async(data)

    return asyncio.run(asyncio.wait_for(sign(), REPLY_TIMEOUT))


def audit_outcomes(log: Path) -> list[str]:
    if not log.exists():
        return []
    return [json.loads(line)["outcome"] for line in log.read_text().splitlines() if line]


# ---- row 1: the private key cannot be read from the signer ------------------


def test_row1_no_reply_carries_private_material(chain: Chain) -> None:
    public_line = start_chain(chain)
    key_blob = key_blob_of(public_line)
    secret = private_blob(chain)
    key_file = (chain.signer_home / "keys" / f"{LABEL}.tss").read_bytes()

    requests = [
        ListRequest(1),
        SignRequest(2, key_blob, b"data to sign"),
        SignRequest(3, b"\x00\x00\x00\x07ssh-rsa", b"data"),
        SignRequest(4, key_blob, b"x" * 70_000),
    ]
    chain.set_decision("approve")
    replies = asyncio.run(exchange(chain, agent_static_key(chain), requests))

    # Every kind of reply the protocol has appears: a listing, a signature, failures.
    assert isinstance(replies[0], ListReply)
    assert [identity.label for identity in replies[0].identities] == [LABEL]
    assert isinstance(replies[1], SignReply)
    assert verify_signature(public_key_from_blob(key_blob), b"data to sign", replies[1].signature)
    assert isinstance(replies[2], Failure) and replies[2].code == FailureCode.UNKNOWN_KEY
    assert isinstance(replies[3], SignReply)

    plaintext = b"".join(encode_message(reply) for reply in replies)
    assert secret not in plaintext
    # Not even a 16-byte piece of the wrapped private part or of the key file.
    for start in range(0, len(secret) - 16, 8):
        assert secret[start : start + 16] not in plaintext
    for start in range(0, len(key_file) - 32, 16):
        assert key_file[start : start + 32] not in plaintext


def test_row1_attributes_are_checked_on_every_load(swtpm, tmp_path) -> None:
    # A key created without dictionary-attack protection (tpm2-pytss's
    # TSSPrivKey sets noDA) loads fine in the TPM, but not through tpmsigner.
    from tpm2_pytss import ESAPI
    from tpm2_pytss.TCTILdr import TCTILdr

    esapi = ESAPI(TCTILdr.parse(swtpm.tcti))
    try:
        key = tpmsigner_tsskey_create(esapi)
    finally:
        esapi.close()
    weak_blob = read_key_file(key.to_pem()).blob

    # The relay records the code of every command that reaches the TPM.  A
    # noDA key's wrong PINs count toward no lockout, so only the commands
    # sent can show that the TPM never saw this key or a PIN for it.
    sent: list[int] = []

    def record(command: bytes, response: bytes) -> bytes:
        sent.append(command_code(command))
        return response

    with TpmRelay(swtpm.server_port, swtpm.ctrl_port) as relay:
        relay.change = record
        with Tpm(relay.tcti) as tpm:
            good_blob = tpm.create_key(PIN.encode())

            sent.clear()
            with pytest.raises(TpmKeyLoadError, match="noDA"):
                tpm.check_loads(weak_blob)
            with pytest.raises(TpmKeyLoadError, match="noDA"):
                tpm.sign_digest(weak_blob, b"\x01" * 32, b"1234")
            sent_for_weak_key = list(sent)

            # Control: the same recording contains the TPM2_Load and TPM2_Sign of a key that tpmsigner accepts.
            sent.clear()
            tpm.sign_digest(good_blob, b"\x01" * 32, PIN.encode())
            sent_for_good_key = list(sent)

    assert TPM2_CC.Load not in sent_for_weak_key
    assert TPM2_CC.Sign not in sent_for_weak_key
    assert TPM2_CC.Load in sent_for_good_key
    assert TPM2_CC.Sign in sent_for_good_key


# ---- row 2: the agent host stores public data and its own Noise key only ----


def test_row2_agent_home_holds_no_key_material(chain: Chain, sshd_factory, tmp_path) -> None:
    public_line = start_chain(chain)
    sshd = sshd_factory(authorized_keys=[public_line])
    login = subprocess.run(
        sshd.ssh_command(chain.agent_socket, "true"), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert login.returncode == 0, login.stderr
    message = tmp_path / "message.txt"
    message.write_text("commit\n")
    assert sign_and_check(chain.agent_environment(), public_line, message).signed.returncode == 0

    secret = private_blob(chain)
    agent_files = [path for root in (chain.agent_home, chain.workdir / "state") for path in root.rglob("*") if path.is_file()]
    assert agent_files, "the agent wrote nothing at all"

    private_keys = []
    for path in agent_files:
        content = path.read_bytes()
        assert PIN.encode() not in content, path
        assert secret not in content, path
        assert b"TSS2 PRIVATE KEY" not in content, path
        if b"PRIVATE KEY" in content:
            private_keys.append(path)
            continue
        if path.suffix == ".lock":
            # The audit log's lock file, which flock(2) uses, stays empty.
            assert content == b"", path
            continue
        # Everything else is JSON (the pinned signers) or JSON lines (the audit log).
        assert path.suffix in (".json", ".jsonl"), f"unexpected file {path}"
        lines = content.decode().splitlines() if path.suffix == ".jsonl" else [content.decode()]
        for line in lines:
            json.loads(line)

    # The one private key is the agent's own X25519 Noise key, the one it pairs with.
    assert [path.name for path in private_keys] == ["noise-static-key.pem"]
    noise_key = serialization.load_pem_private_key(private_keys[0].read_bytes(), password=None)
    assert isinstance(noise_key, X25519PrivateKey)
    own = noise_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert channel.format_public_key(own) == chain.tpmsigner_agent("id").stdout.strip()


# ---- row 3: the wire shows nothing -------------------------------------------


def test_row3_captured_traffic_reveals_nothing(chain: Chain, sshd_factory, tmp_path) -> None:
    public_line = chain.keygen(LABEL, PIN)
    chain.tpmsigner("allow", "test-laptop", chain.tpmsigner_agent("id").stdout.strip())
    signer = chain.start_signer()
    with RecordingRelay(chain.signer_port) as relay:
        # The agent reaches the signer only through the recording relay.
        chain.tpmsigner_agent("trust", "test-signer", f"{LOCALHOST}:{relay.port}", chain.tpmsigner("id").stdout.strip())
        chain.start_agent()

        listed = chain.ssh_add("-L")
        sshd = sshd_factory(authorized_keys=[public_line])
        login = subprocess.run(
            sshd.ssh_command(chain.agent_socket, "true"), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
        message = tmp_path / "message.txt"
        payload = b"secret-commit-payload-7d1f"
        message.write_bytes(payload)
        signed = sign_and_check(chain.agent_environment(), public_line, message, namespace="ns-unusual-9b2")
        chain.agent.stop() if chain.agent else None
        captured = relay.captured()

    assert listed.stdout.strip() == public_line
    assert login.returncode == 0, login.stderr
    assert signed.checked is not None and signed.checked.returncode == 0
    assert signer.log_text().count("signed with") == 2
    assert len(captured) > 1000, "the relay saw too little traffic to mean anything"

    signature_file = signed.signature_file.read_text()
    sshsig = base64.b64decode("".join(signature_file.splitlines()[1:-1]))
    key_blob = key_blob_of(public_line)
    needles = {
        "key label": LABEL.encode(),
        "user name": sshd.user.encode() + b"@",
        "public key blob": key_blob,
        "public key in base64": public_line.split()[1].encode(),
        "public key curve point": key_blob[-65:],
        "namespace": b"ns-unusual-9b2",
        "signed data": payload,
        "SSHSIG signature": sshsig[-40:],
        "PIN": PIN.encode(),
        "device name": b"test-laptop",
        "ssh command line": b"StrictHostKeyChecking",
        # Noise XX sends both static keys encrypted, in messages 2 and 3.
        "agent's Noise static key": agent_static_key(chain).public,
        "signer's Noise static key": signer_public_key(chain),
    }
    for what, needle in needles.items():
        assert needle not in captured, f"the {what} crossed the wire in clear"


# ---- row 4: replayed signatures and replayed frames --------------------------


class _RecordingKey(asyncssh.SSHKeyPair):
    """An asyncssh client key that signs through an agent key and keeps the signature."""

    def __init__(self, inner: asyncssh.SSHKeyPair) -> None:
        super().__init__(
            inner.algorithm, inner.sig_algorithm, inner.sig_algorithms, inner.host_key_algorithms, inner.public_data, b""
        )
        self._inner = inner
        self.signatures: list[bytes] = []

    async def sign_async(self, data: bytes) -> bytes:
        signature = await self._inner.sign_async(data)
        self.signatures.append(signature)
        return signature


class _ReplayKey(asyncssh.SSHKeyPair):
    """An asyncssh client key that returns one captured signature for every challenge."""

    def __init__(self, template: asyncssh.SSHKeyPair, signature: bytes) -> None:
        super().__init__(
            template.algorithm,
            template.sig_algorithm,
            template.sig_algorithms,
            template.host_key_algorithms,
            template.public_data,
            b"",
        )
        self._signature = signature

    async def sign_async(self, data: bytes) -> bytes:
        return self._signature


async def _login(sshd, keypair: asyncssh.SSHKeyPair) -> None:
    async with asyncssh.connect(
        LOCALHOST,
        sshd.port,
        username=sshd.user,
        client_keys=[keypair],
        known_hosts=str(sshd.known_hosts_file),
        agent_path=None,
        preferred_auth="publickey",
        config=None,
    ) as connection:
        result = await connection.run("true", check=True)
        assert result.exit_status == 0


def test_row4_replayed_login_signature_is_rejected(chain: Chain, sshd_factory) -> None:
    public_line = start_chain(chain)
    first = sshd_factory(authorized_keys=[public_line])
    second = sshd_factory(authorized_keys=[public_line])

    async def scenario() -> None:
        async with asyncssh.connect_agent(str(chain.agent_socket)) as agent:
            [agent_key] = await agent.get_keys()
            recording = _RecordingKey(agent_key)
            await asyncio.wait_for(_login(first, recording), REPLY_TIMEOUT)
        [signature] = recording.signatures

        # The same signature, offered to another host and to a new session
        # with the first one, proves nothing: it covers the old session id.
        for sshd in (second, first):
            with pytest.raises(asyncssh.PermissionDenied):
                await asyncio.wait_for(_login(sshd, _ReplayKey(agent_key, signature)), REPLY_TIMEOUT)

    asyncio.run(scenario())

    # One approval for the one real login; the replays never reached the signer.
    assert len(chain.approver_requests()) == 1
    assert audit_outcomes(chain.signer_audit_log) == ["approved"]


def test_row4_replayed_noise_frames_sign_nothing(chain: Chain) -> None:
    public_line = chain.keygen(LABEL, PIN)
    chain.tpmsigner("allow", "test-laptop", chain.tpmsigner_agent("id").stdout.strip())
    signer = chain.start_signer()
    with RecordingRelay(chain.signer_port) as relay:
        chain.tpmsigner_agent("trust", "test-signer", f"{LOCALHOST}:{relay.port}", chain.tpmsigner("id").stdout.strip())
        chain.start_agent()
        signature = sign_through_agent(chain, public_line, b"once")
        assert chain.agent is not None
        chain.agent.stop()
        wait_until(lambda: "disconnected" in signer.log_text(), 10, "the signer to see the agent leave")
        [recorded] = relay.connections
        sent = bytes(recorded.to_target)
        first_reply = bytes(recorded.from_target)

    assert verify_signature(public_key_from_blob(key_blob_of(public_line)), b"once", signature)
    assert len(chain.approver_requests()) == 1

    # Send everything the agent sent, byte for byte, on a new connection.
    with socket.create_connection((LOCALHOST, chain.signer_port), timeout=10) as replay:
        replay.sendall(sent)
        replay.settimeout(10)
        answer = b""
        while chunk := replay.recv(65536):
            answer += chunk

    # The signer answered the replayed first handshake message with a fresh
    # ephemeral key, so the replayed third message failed and it closed.
    # Each handshake message is framed by a 2-byte length, and the second
    # one starts with the responder's 32-byte ephemeral public key.
    assert 0 < len(answer) < 200
    assert answer[2:34] != first_reply[2:34]
    wait_until(lambda: "failed during the handshake" in signer.log_text(), 10, "the signer to reject the replay")
    assert len(chain.approver_requests()) == 1
    assert signer.log_text().count("signed with") == 1
    assert audit_outcomes(chain.signer_audit_log) == ["approved"]


# ---- row 5: nothing on the agent host can sign --------------------------------


def test_row5_agent_host_cannot_sign_without_signer(chain: Chain, tmp_path) -> None:
    public_line = start_chain(chain)
    signature = sign_through_agent(chain, public_line, b"while the signer runs")
    assert verify_signature(public_key_from_blob(key_blob_of(public_line)), b"while the signer runs", signature)
    assert chain.signer is not None
    chain.signer.stop()

    with pytest.raises(ValueError):
        sign_through_agent(chain, public_line, b"without the signer")

    # No file of the agent host loads as the identity's private key, in any
    # format OpenSSH or OpenSSL would read it in.
    identity = asyncssh.import_public_key(public_line)
    agent_files = [path for root in (chain.agent_home, chain.workdir / "state") for path in root.rglob("*") if path.is_file()]
    assert agent_files, "the agent wrote nothing at all, so the check below would pass without looking"
    for path in agent_files:
        content = path.read_bytes()
        for loader in (asyncssh.import_private_key,):
            try:
                key = loader(content)
            except (asyncssh.KeyImportError, ValueError, UnicodeDecodeError):
                continue
            assert key.public_data != identity.public_data, path
        try:
            key = serialization.load_pem_private_key(content, password=None)
        except (ValueError, TypeError):
            continue
        assert isinstance(key, X25519PrivateKey), f"{path} holds a signing key"


# ---- row 6: unpaired keys get nothing; paired devices still ask every time ----


def test_row6_unpaired_key_is_closed_after_handshake(chain: Chain) -> None:
    start_chain(chain)
    stranger = channel.StaticKey.generate()

    async def attempt() -> bytes | None:
        reader, writer = await asyncio.open_connection(LOCALHOST, chain.signer_port)
        # Noise XX: the initiator's static key travels in the third message,
        # so the handshake completes on this side and the signer decides after it.
        secure = await channel.initiate(reader, writer, stranger, signer_public_key(chain))
        await secure.send(encode_message(ListRequest(1)))
        try:
            return await asyncio.wait_for(secure.receive(), REPLY_TIMEOUT)
        except channel.ChannelError:
            return None
        finally:
            await secure.close()

    assert asyncio.run(attempt()) is None
    assert chain.signer is not None
    wait_until(lambda: "is not allowed" in chain.signer.log_text(), 10, "the signer to reject the key")
    assert chain.approver_requests() == []
    assert "device" not in chain.signer.log_text().split("is not allowed")[1]


def test_row6_every_request_asks_and_refusal_signs_nothing(chain: Chain) -> None:
    public_line = start_chain(chain)
    key = public_key_from_blob(key_blob_of(public_line))

    for number in range(1, 4):
        signature = sign_through_agent(chain, public_line, b"request %d" % number)
        assert verify_signature(key, b"request %d" % number, signature)
        assert len(chain.approver_requests()) == number

    chain.set_decision("deny")
    with pytest.raises(ValueError):
        sign_through_agent(chain, public_line, b"refused")
    assert len(chain.approver_requests()) == 4
    assert audit_outcomes(chain.signer_audit_log) == ["approved"] * 3 + ["denied"]
    assert chain.signer is not None and chain.signer.log_text().count("signed with") == 3


# ---- row 7: a flood of requests ---------------------------------------------------


def test_row7_flood_prompts_each_time_then_device_is_paused(chain: Chain) -> None:
    # The pause is far longer than the test, so every request after the
    # flood falls inside it however slow the machine is.
    public_line = start_chain(chain, "--refusal-limit", "3", "--refusal-pause", "600")
    chain.set_decision("deny")

    async def flood(count: int) -> list[BaseException | bytes]:
        async with asyncssh.connect_agent(str(chain.agent_socket)) as agent:
            key = asyncssh.import_public_key(public_line)
            keypair = asyncssh.agent.SSHAgentKeyPair(agent, key.algorithm, key.public_data, b"")
            tasks = [keypair.sign_async(b"flood %d" % number) for number in range(count)]
            return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)

    results = asyncio.run(flood(8))

    # Nothing signed; every request the person did not see was refused
    # outright, and at least the first three were shown.
    assert all(isinstance(result, ValueError) for result in results), results
    prompts = len(chain.approver_requests())
    assert 3 <= prompts <= 8
    assert chain.signer is not None
    log = chain.signer.log_text()
    assert "signed with" not in log
    assert "refusing its requests without asking for 600 s" in log

    # During the pause a request is rejected with the reason and without a
    # prompt, even one that the person would approve.
    chain.set_decision("approve")
    with pytest.raises(ValueError):
        sign_through_agent(chain, public_line, b"during the pause")
    assert len(chain.approver_requests()) == prompts
    wait_until(lambda: "its requests are paused for" in chain.signer.log_text(), 10, "the pause to be logged")
    assert "signed with" not in chain.signer.log_text()
    assert audit_outcomes(chain.signer_audit_log).count("approved") == 0


def test_row7_device_is_asked_again_after_the_pause(chain: Chain) -> None:
    public_line = start_chain(chain, "--refusal-limit", "1", "--refusal-pause", "1")
    chain.set_decision("deny")
    with pytest.raises(ValueError):
        sign_through_agent(chain, public_line, b"refused")
    assert chain.signer is not None
    assert "refusing its requests without asking for 1 s" in chain.signer.log_text()

    # Waiting longer than the pause is safe on any machine, because a slow
    # machine only makes the wait longer.
    time.sleep(2.0)
    chain.set_decision("approve")
    signature = sign_through_agent(chain, public_line, b"after the pause")

    assert verify_signature(public_key_from_blob(key_blob_of(public_line)), b"after the pause", signature)
    assert len(chain.approver_requests()) == 2
    assert audit_outcomes(chain.signer_audit_log) == ["denied", "approved"]


def test_row7_refusal_counts_reset_on_approval(chain: Chain) -> None:
    public_line = start_chain(chain, "--refusal-limit", "2", "--refusal-pause", "60")

    for _ in range(3):
        chain.set_decision("deny")
        with pytest.raises(ValueError):
            sign_through_agent(chain, public_line, b"no")
        chain.set_decision("approve")
        signature = sign_through_agent(chain, public_line, b"yes")
        assert verify_signature(public_key_from_blob(key_blob_of(public_line)), b"yes", signature)

    # One refusal at a time, each followed by an approval, never starts a pause.
    assert len(chain.approver_requests()) == 6
    assert chain.signer is not None
    assert "refusing its requests without asking" not in chain.signer.log_text()


def test_row7_unanswered_prompts_count_as_refusals(chain: Chain) -> None:
    public_line = chain.keygen(LABEL, PIN)
    chain.pair()
    chain.start_signer("--refusal-limit", "2", "--refusal-pause", "600", approval_timeout=1.0)
    chain.start_agent()
    # The approver never decides, so each prompt runs out its time.
    chain.hold_approvals()

    for number in range(2):
        with pytest.raises(ValueError):
            sign_through_agent(chain, public_line, b"unanswered %d" % number)

    chain.release_approvals()
    with pytest.raises(ValueError):
        sign_through_agent(chain, public_line, b"during the pause")

    assert len(chain.approver_requests()) == 2
    assert chain.signer is not None
    assert "was refused 2 times in a row; refusing its requests without asking for 600 s" in chain.signer.log_text()
    assert audit_outcomes(chain.signer_audit_log)[:2] == ["timed_out", "timed_out"]


def test_row7_default_limit_and_pause(chain: Chain) -> None:
    public_line = start_chain(chain)
    chain.set_decision("deny")

    for number in range(5):
        with pytest.raises(ValueError):
            sign_through_agent(chain, public_line, b"refused %d" % number)
    with pytest.raises(ValueError):
        sign_through_agent(chain, public_line, b"during the pause")

    # docs/SECURITY.md: after 5 refusals in a row, a pause of 30 s.
    assert len(chain.approver_requests()) == 5
    assert chain.signer is not None
    assert "was refused 5 times in a row; refusing its requests without asking for 30 s" in chain.signer.log_text()
    assert "its requests are paused for" in chain.signer.log_text()


def test_refusal_options_are_checked(chain: Chain) -> None:
    for option, value, message in (
        ("--refusal-limit", "0", "--refusal-limit must be at least 1"),
        ("--refusal-pause", "-1", "--refusal-pause must be between 0 and 600"),
        ("--refusal-pause", "nan", "--refusal-pause must be between 0 and 600"),
    ):
        result = chain.tpmsigner(
            "serve", "--listen", f"{LOCALHOST}:0", "--approver", "tty", "--no-mdns", option, value, check=False
        )
        assert result.returncode != 0
        assert message in result.stderr


# ---- row 10: a revoked device, naming a key blob directly ------------------------


def test_row10_revoked_device_is_refused_when_naming_blob(chain: Chain) -> None:
    public_line = start_chain(chain)
    static = agent_static_key(chain)
    assert isinstance(asyncio.run(exchange(chain, static, [ListRequest(1)]))[0], ListReply)

    chain.tpmsigner("revoke", "test-laptop")

    with pytest.raises(channel.ChannelError):
        asyncio.run(exchange(chain, static, [SignRequest(2, key_blob_of(public_line), b"after revocation")]))
    assert chain.approver_requests() == []
    assert os.path.exists(chain.signer_audit_log) is False or audit_outcomes(chain.signer_audit_log) == []
