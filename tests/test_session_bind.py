"""session-bind@openssh.com on the agent socket: OpenSSH's rules, with real host key signatures."""

from __future__ import annotations

import subprocess

import asyncssh
import pytest
from asyncssh.packet import Boolean, Byte, String

from tpmsigner_agent.destination import parse_ssh_command, verified_host_name
from tests.support.chain import Chain
from tests.test_agent_input import RawAgentClient

PIN = "4711-session-bind"
SUCCESS = b"\x06"
FAILURE = b"\x05"
EXTENSION_FAILURE = b"\x1c"


def bind_message(host_key: asyncssh.SSHKey, session_id: bytes, forwarding: bool, algorithm: bytes | None = None) -> bytes:
    algorithm = algorithm or host_key.sig_algorithms[0]
    signature = host_key.sign(session_id, algorithm)
    return (
        Byte(27)
        + String("session-bind@openssh.com")
        + String(host_key.public_data)
        + String(session_id)
        + String(signature)
        + Boolean(forwarding)
    )


@pytest.fixture
def client(chain: Chain):
    chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    chain.start_agent()
    raw = RawAgentClient(chain.agent_socket)
    yield raw
    raw.close()


@pytest.mark.parametrize(
    ("key_type", "algorithm"),
    [
        ("ssh-ed25519", b"ssh-ed25519"),
        ("ecdsa-sha2-nistp256", b"ecdsa-sha2-nistp256"),
        ("ecdsa-sha2-nistp384", b"ecdsa-sha2-nistp384"),
        ("ecdsa-sha2-nistp521", b"ecdsa-sha2-nistp521"),
        ("ssh-rsa", b"rsa-sha2-256"),
        ("ssh-rsa", b"rsa-sha2-512"),
    ],
)
def test_valid_binding_succeeds(client: RawAgentClient, key_type: str, algorithm: bytes) -> None:
    host_key = asyncssh.generate_private_key(key_type)
    client.send_message(bind_message(host_key, b"\x01" * 32, False, algorithm))
    assert client.read_reply() == SUCCESS


def test_sha1_rsa_binding_is_rejected(client: RawAgentClient) -> None:
    host_key = asyncssh.generate_private_key("ssh-rsa")
    client.send_message(bind_message(host_key, b"\x01" * 32, False, b"ssh-rsa"))
    assert client.read_reply() == EXTENSION_FAILURE


def test_bad_signature_gets_extension_failure(client: RawAgentClient) -> None:
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    message = bind_message(host_key, b"\x01" * 32, False)
    # Flip a byte of the signature, which sits just before the final boolean.
    tampered = message[:-3] + bytes([message[-3] ^ 0x01]) + message[-2:]
    client.send_message(tampered)
    assert client.read_reply() == EXTENSION_FAILURE

    # The connection stays usable.
    client.send_message(Byte(11))
    assert client.read_reply()[0] == 12


def test_rebinding_after_authentication_is_refused(client: RawAgentClient) -> None:
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client.send_message(bind_message(host_key, b"\x01" * 32, False))
    assert client.read_reply() == SUCCESS
    client.send_message(bind_message(host_key, b"\x02" * 32, False))
    assert client.read_reply() == FAILURE


def test_more_than_sixteen_bindings_are_refused(client: RawAgentClient) -> None:
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    for number in range(16):
        client.send_message(bind_message(host_key, bytes([number]) * 32, True))
        assert client.read_reply() == SUCCESS
    client.send_message(bind_message(host_key, b"\xff" * 32, True))
    assert client.read_reply() == FAILURE


def test_login_for_another_session_is_refused(chain: Chain, client: RawAgentClient) -> None:
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client.send_message(bind_message(host_key, b"\x01" * 32, False))
    assert client.read_reply() == SUCCESS
    client.send_message(Byte(11))
    answer = client.read_reply()
    key_blob = asyncssh.import_public_key(chain.tpmsigner("show", "work").stdout.splitlines()[0]).public_data
    assert key_blob in answer

    userauth = (
        String(b"\x02" * 32) + Byte(50) + String("root") + String("ssh-connection") + String("publickey")
        + Boolean(True) + String("ecdsa-sha2-nistp256") + String(key_blob)
    )
    client.send_message(Byte(13) + String(key_blob) + String(userauth) + b"\x00\x00\x00\x00")

    assert client.read_reply() == FAILURE
    assert chain.approver_requests() == []


def test_hashed_known_hosts_entry_verifies(tmp_path) -> None:
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    public_line = host_key.export_public_key().decode().strip()
    plain = tmp_path / "plain"
    plain.write_text(f"[server.example]:2222 {public_line}\n")
    hashed = tmp_path / "hashed"
    hashed.write_text(plain.read_text())
    subprocess.run(["ssh-keygen", "-H", "-f", str(hashed)], check=True, capture_output=True)
    assert "server.example" not in hashed.read_text()

    for known_hosts in (plain, hashed):
        target = parse_ssh_command(
            ["ssh", "-p", "2222", "-o", f"UserKnownHostsFile={known_hosts}", "alice@server.example", "true"], "/root"
        )
        assert verified_host_name(target, host_key.public_data) == ("server.example", True)
        other = asyncssh.generate_private_key("ssh-ed25519")
        assert verified_host_name(target, other.public_data) == ("server.example", False)


@pytest.mark.parametrize(
    ("arguments", "host", "port"),
    [
        (["ssh", "host.example"], "host.example", None),
        (["ssh", "-p", "2200", "bob@host.example", "ls"], "host.example", 2200),
        (["ssh", "-p2200", "-l", "bob", "host.example"], "host.example", 2200),
        (["ssh", "-o", "Port=2201", "-o", "Port=2202", "host.example"], "host.example", 2201),
        (["ssh", "-o", "HostKeyAlias=alias.example", "10.0.0.1"], "alias.example", None),
        (["ssh", "ssh://carol@[2001:db8::1]:2203"], "2001:db8::1", 2203),
        (["ssh", "-A", "-v", "--", "host.example"], "host.example", None),
    ],
)
def test_ssh_command_lines_name_the_target(arguments: list[str], host: str, port: int | None) -> None:
    target = parse_ssh_command(arguments, "/home/user")
    assert target is not None
    assert target.host == host
    assert target.port == port


def test_same_binding_twice_is_accepted_once(client: RawAgentClient) -> None:
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    for _ in range(20):
        client.send_message(bind_message(host_key, b"\x05" * 32, True))
        assert client.read_reply() == SUCCESS


def test_session_id_bound_to_other_key_is_refused(client: RawAgentClient) -> None:
    first = asyncssh.generate_private_key("ssh-ed25519")
    second = asyncssh.generate_private_key("ssh-ed25519")
    client.send_message(bind_message(first, b"\x05" * 32, True))
    assert client.read_reply() == SUCCESS
    client.send_message(bind_message(second, b"\x05" * 32, True))
    assert client.read_reply() == FAILURE
