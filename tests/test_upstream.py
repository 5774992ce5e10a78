"""``run --upstream``: the keys of a real OpenSSH ssh-agent beside the signer's, through one socket."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest
from asyncssh.packet import Byte, SSHPacket, String, UInt32

from tests.support import OpenSshAgent, SshKeyPair, generate_key_pair
from tests.support.chain import Chain
from tests.test_agent_input import RawAgentClient

PIN = "4711-upstream"
IDENTITIES_ANSWER = 12
SIGN_RESPONSE = 14
# draft-miller-ssh-agent section 4.5.1, signature flags for RSA keys.
SSH_AGENT_RSA_SHA2_256 = 2
SSH_AGENT_RSA_SHA2_512 = 4


@dataclass
class Setup:
    chain: Chain
    upstream: OpenSshAgent
    tpm_line: str
    file_key: SshKeyPair


def start(chain: Chain, upstream: OpenSshAgent, tmp_path: Path, key_type: str = "ed25519") -> Setup:
    tpm_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    file_key = generate_key_pair(tmp_path / "file-key", key_type, comment="file-key")
    upstream.add_key(file_key.private_key)
    chain.start_agent("--upstream", str(upstream.socket_path))
    return Setup(chain, upstream, tpm_line, file_key)


@pytest.fixture
def setup(chain: Chain, openssh_agent: OpenSshAgent, tmp_path: Path) -> Setup:
    return start(chain, openssh_agent, tmp_path)


def login(chain: Chain, sshd, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sshd.ssh_command(chain.agent_socket, "echo logged-in", extra_options=list(options)),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def listed_lines(chain: Chain) -> list[str]:
    return chain.ssh_add("-L").stdout.splitlines()


def key_blob(public_line: str) -> bytes:
    return asyncssh.import_public_key(public_line).public_data


def identities(reply: bytes) -> list[bytes]:
    assert reply[0] == IDENTITIES_ANSWER
    packet = SSHPacket(reply[1:])
    blobs = []
    for _ in range(packet.get_uint32()):
        blobs.append(packet.get_string())
        packet.get_string()
    packet.check_end()
    return blobs


def sign_request(public_line: str, data: bytes, flags: int) -> bytes:
    return Byte(13) + String(key_blob(public_line)) + String(data) + UInt32(flags)


def signature_algorithm(reply: bytes) -> bytes:
    assert reply[0] == SIGN_RESPONSE
    signature = SSHPacket(reply[1:]).get_string()
    return SSHPacket(signature).get_string()


def audit_records(chain: Chain) -> list[dict]:
    return [json.loads(line) for line in chain.agent_audit_log.read_text().splitlines()]


def test_listing_shows_own_keys_then_upstream_keys(setup: Setup) -> None:
    assert listed_lines(setup.chain) == [setup.tpm_line, setup.file_key.public_key_line]


def test_login_with_upstream_key_skips_approver(setup: Setup, sshd_factory) -> None:
    sshd = sshd_factory(authorized_keys=[setup.file_key.public_key_line])

    result = login(setup.chain, sshd)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "logged-in"
    assert setup.chain.approver_requests() == []
    record = audit_records(setup.chain)[-1]
    assert record["upstream"] == str(setup.upstream.socket_path)
    assert record["outcome"] == "signed"
    assert record["purpose"] == "ssh-login"
    assert record["signer"] == ""
    assert record["key_fingerprint"] in subprocess.run(
        ["ssh-keygen", "-lf", str(setup.file_key.public_key_file)], capture_output=True, text=True, check=True
    ).stdout
    assert setup.chain.agent is not None
    assert "forwarded to the upstream agent" in setup.chain.agent.log_text()


def test_login_with_tpm_key_still_asks_approver(setup: Setup, sshd_factory) -> None:
    sshd = sshd_factory(authorized_keys=[setup.tpm_line])

    result = login(setup.chain, sshd)

    assert result.returncode == 0, result.stderr
    requests = setup.chain.approver_requests()
    assert len(requests) == 1
    assert requests[0]["TPMSIGNER_DESTINATION_VERIFIED"] == "yes"
    record = audit_records(setup.chain)[-1]
    assert record["outcome"] == "approved"
    assert "upstream" not in record


def test_upstream_reply_is_passed_back_unchanged(setup: Setup) -> None:
    # Ed25519 signatures are deterministic (RFC 8032), so both replies must
    # be the same bytes.
    request = sign_request(setup.file_key.public_key_line, b"payload for both agents", 0)
    through_us = RawAgentClient(setup.chain.agent_socket)
    direct = RawAgentClient(setup.upstream.socket_path)
    try:
        through_us.send_message(request)
        direct.send_message(request)
        assert through_us.read_reply() == direct.read_reply()
    finally:
        through_us.close()
        direct.close()


def test_rsa_flags_reach_upstream(chain: Chain, openssh_agent: OpenSshAgent, tmp_path: Path, sshd_factory) -> None:
    setup = start(chain, openssh_agent, tmp_path, key_type="rsa")
    public_key = asyncssh.import_public_key(setup.file_key.public_key_line)
    client = RawAgentClient(chain.agent_socket)
    replies = {}
    try:
        for flags in (0, SSH_AGENT_RSA_SHA2_256, SSH_AGENT_RSA_SHA2_512):
            client.send_message(sign_request(setup.file_key.public_key_line, b"rsa payload", flags))
            replies[flags] = client.read_reply()
    finally:
        client.close()

    assert signature_algorithm(replies[0]) == b"ssh-rsa"
    assert signature_algorithm(replies[SSH_AGENT_RSA_SHA2_256]) == b"rsa-sha2-256"
    assert signature_algorithm(replies[SSH_AGENT_RSA_SHA2_512]) == b"rsa-sha2-512"
    signature = SSHPacket(replies[SSH_AGENT_RSA_SHA2_512][1:]).get_string()
    assert public_key.verify(b"rsa payload", signature)

    sshd = sshd_factory(
        authorized_keys=[setup.file_key.public_key_line], extra_config=["PubkeyAcceptedAlgorithms rsa-sha2-512"]
    )
    # This sshd accepts only rsa-sha2-512 signatures, which ssh asks for
    # with the SSH_AGENT_RSA_SHA2_512 flag.
    result = login(chain, sshd)
    assert result.returncode == 0, result.stderr


def test_restarted_upstream_is_reconnected(setup: Setup, sshd_factory) -> None:
    sshd = sshd_factory(authorized_keys=[setup.file_key.public_key_line])
    file_blob = key_blob(setup.file_key.public_key_line)
    tpm_blob = key_blob(setup.tpm_line)
    client = RawAgentClient(setup.chain.agent_socket)
    try:
        client.send_message(Byte(11))
        before = identities(client.read_reply())

        # A crash: the socket file stays behind, as after SIGKILL.
        assert setup.upstream.process is not None
        setup.upstream.process.kill()
        setup.upstream.process.wait(timeout=10)
        client.send_message(Byte(11))
        while_down = identities(client.read_reply())
        down_login = login(setup.chain, sshd)

        setup.upstream.socket_path.unlink()
        setup.upstream.start()
        setup.upstream.add_key(setup.file_key.private_key)
        client.send_message(Byte(11))
        after = identities(client.read_reply())

        # Restarted again between two requests: the first request after it
        # finds the old upstream connection closed and is sent again.
        setup.upstream.stop()
        setup.upstream.start()
        setup.upstream.add_key(setup.file_key.private_key)
        client.send_message(sign_request(setup.file_key.public_key_line, b"after the restart", 0))
        signed = client.read_reply()
    finally:
        client.close()

    assert before == [tpm_blob, file_blob]
    assert while_down == [tpm_blob]
    assert down_login.returncode == 255
    assert after == [tpm_blob, file_blob]
    assert signed[0] == SIGN_RESPONSE
    assert login(setup.chain, sshd).returncode == 0
    assert setup.chain.agent is not None
    log = setup.chain.agent.log_text()
    assert "listing only this agent's keys, the upstream agent failed" in log
    assert f"cannot connect to the upstream agent at {setup.upstream.socket_path}" in log
    assert f"the upstream agent at {setup.upstream.socket_path} closed the connection; reconnecting" in log


def test_upstream_warnings_are_rate_limited(setup: Setup) -> None:
    setup.upstream.stop()
    client = RawAgentClient(setup.chain.agent_socket)
    try:
        for _ in range(25):
            client.send_message(Byte(11))
            assert identities(client.read_reply()) == [key_blob(setup.tpm_line)]
    finally:
        client.close()

    assert setup.chain.agent is not None
    warnings = [line for line in setup.chain.agent.log_text().splitlines() if "the upstream agent failed" in line]
    assert len(warnings) == 10


def test_agent_starts_before_upstream(chain: Chain, short_tmp_path: Path, tmp_path: Path) -> None:
    tpm_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    upstream = OpenSshAgent(socket_path=short_tmp_path / "later.sock")
    agent = chain.start_agent("--upstream", str(upstream.socket_path))
    file_key = generate_key_pair(tmp_path / "file-key", "ed25519", comment="file-key")

    alone = listed_lines(chain)
    upstream.start()
    try:
        upstream.add_key(file_key.private_key)
        together = listed_lines(chain)
    finally:
        upstream.stop()

    assert f"cannot reach the upstream agent at {upstream.socket_path}" in agent.log_text()
    assert alone == [tpm_line]
    assert together == [tpm_line, file_key.public_key_line]


def test_key_management_goes_upstream(setup: Setup, tmp_path: Path) -> None:
    second = generate_key_pair(tmp_path / "second-key", "ecdsa", comment="second-key")
    tpm_pub = tmp_path / "tpm.pub"
    tpm_pub.write_text(setup.tpm_line + "\n")

    added = setup.chain.ssh_add(str(second.private_key))
    upstream_after_add = setup.upstream.public_key_lines()
    removed = setup.chain.ssh_add("-d", str(second.public_key_file))
    upstream_after_remove = setup.upstream.public_key_lines()
    tpm_removal = setup.chain.ssh_add("-d", str(tpm_pub))
    removed_all = setup.chain.ssh_add("-D")

    assert added.returncode == 0, added.stderr
    assert second.public_key_line in upstream_after_add
    assert removed.returncode == 0, removed.stderr
    assert second.public_key_line not in upstream_after_remove
    assert tpm_removal.returncode != 0
    assert removed_all.returncode == 0, removed_all.stderr
    assert setup.upstream.public_key_lines() == []
    # The signer's keys cannot be removed through the agent.
    assert listed_lines(setup.chain) == [setup.tpm_line]


def test_lock_is_not_forwarded(setup: Setup) -> None:
    client = RawAgentClient(setup.chain.agent_socket)
    try:
        client.send_message(Byte(22) + String("lock passphrase"))
        reply = client.read_reply()
    finally:
        client.close()

    assert reply == Byte(5)
    assert setup.upstream.public_key_lines() == [setup.file_key.public_key_line]


def test_destination_constraints_of_upstream_keys_hold(
    setup: Setup, sshd_factory, tmp_path: Path
) -> None:
    sshd = sshd_factory(authorized_keys=[setup.file_key.public_key_line])
    destination = f"[127.0.0.1]:{sshd.port}"
    setup.upstream.ssh_add("-D")
    other_hosts = tmp_path / "other_known_hosts"
    other_host_key = generate_key_pair(tmp_path / "other-host-key", "ed25519")
    other_hosts.write_text(f"elsewhere.example {other_host_key.public_key_line}\n")

    # Added through this agent, so the constrained add is forwarded too.
    to_elsewhere = setup.chain.ssh_add(
        "-H", str(other_hosts), "-h", "elsewhere.example", str(setup.file_key.private_key)
    )
    refused = login(setup.chain, sshd)
    to_sshd = setup.chain.ssh_add(
        "-H", str(sshd.known_hosts_file), "-h", destination, str(setup.file_key.private_key)
    )
    allowed = login(setup.chain, sshd)

    assert to_elsewhere.returncode == 0, to_elsewhere.stderr
    assert refused.returncode == 255
    assert to_sshd.returncode == 0, to_sshd.stderr
    # The upstream agent lets the key sign only after it saw the session
    # binding for this sshd's host key, which this agent passed on.
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.strip() == "logged-in"


def test_own_socket_as_upstream_is_rejected(chain: Chain) -> None:
    chain.pair()
    result = chain.tpmsigner_agent(
        "run", "--foreground", "--socket", str(chain.agent_socket), "--upstream", str(chain.agent_socket), check=False
    )

    assert result.returncode == 1
    assert "is this agent's own socket" in result.stderr
    assert not chain.agent_socket.exists()
