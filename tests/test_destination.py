"""Verified destinations: session-bind@openssh.com, known_hosts, and the signer's own check."""

from __future__ import annotations

import asyncio
import subprocess

import asyncssh
import pytest
from asyncssh.packet import Boolean, Byte, String

from tpmsigner.protocol import channel
from tpmsigner.protocol.messages import Failure, SignReply, SignRequest, decode_message, encode_message
from tpmsigner.protocol.sessionbind import BindingEvidence, SessionBind
from tests.support.chain import Chain

PIN = "4711-destination"


def start(chain: Chain) -> str:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    chain.start_agent()
    return public_line


def login(chain: Chain, sshd, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sshd.ssh_command(chain.agent_socket, "echo logged-in", extra_options=list(extra)),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def host_key_fingerprint(sshd) -> str:
    result = subprocess.run(
        ["ssh-keygen", "-lf", str(sshd.host_key) + ".pub"], capture_output=True, text=True, check=True
    )
    return result.stdout.split()[1]


def test_login_shows_verified_destination(chain: Chain, sshd_factory) -> None:
    public_line = start(chain)
    sshd = sshd_factory(authorized_keys=[public_line])

    result = login(chain, sshd)

    assert result.returncode == 0, result.stderr
    seen = chain.approver_requests()[0]
    assert seen["TPMSIGNER_DESTINATION"] == f"{sshd.user}@127.0.0.1"
    assert seen["TPMSIGNER_DESTINATION_VERIFIED"] == "yes"
    assert seen["TPMSIGNER_HOST_KEY_FINGERPRINT"] == host_key_fingerprint(sshd)
    assert seen["TPMSIGNER_FORWARDED"] == "no"


def test_unknown_host_name_is_not_verified(chain: Chain, sshd_factory) -> None:
    public_line = start(chain)
    sshd = sshd_factory(authorized_keys=[public_line])
    # ssh accepts any host key and has no known_hosts to name it from.
    argv = [
        "UserKnownHostsFile=/dev/null" if argument.startswith("UserKnownHostsFile=") else argument
        for argument in sshd.ssh_command(chain.agent_socket, "echo logged-in")
    ]
    argv = ["StrictHostKeyChecking=no" if argument.startswith("StrictHostKeyChecking=") else argument for argument in argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    assert result.returncode == 0, result.stderr
    seen = chain.approver_requests()[0]
    assert seen["TPMSIGNER_DESTINATION"] == f"{sshd.user}@127.0.0.1"
    assert seen["TPMSIGNER_DESTINATION_VERIFIED"] == "no"
    assert seen["TPMSIGNER_HOST_KEY_FINGERPRINT"] == host_key_fingerprint(sshd)


def test_query_extension_lists_session_bind(chain: Chain) -> None:
    start(chain)

    async def query() -> list[str]:
        async with asyncssh.connect_agent(str(chain.agent_socket)) as agent:
            return list(await agent.query_extensions())

    assert asyncio.run(asyncio.wait_for(query(), 30)) == ["query", "session-bind@openssh.com"]


def test_second_hop_is_marked_forwarded(chain: Chain, sshd_factory) -> None:
    public_line = start(chain)
    second = sshd_factory(authorized_keys=[public_line])
    first = sshd_factory(authorized_keys=[public_line], extra_config=["AllowAgentForwarding yes"])
    # On the first host, ssh reaches the second through the forwarded agent.
    inner = " ".join(
        [
            "ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=yes",
            f"-o UserKnownHostsFile={second.known_hosts_file} -o IdentitiesOnly=no",
            f"-o IdentityFile={second.workdir / 'none'}",
            f"-p {second.port} {second.user}@127.0.0.1 echo second-hop",
        ]
    )

    result = subprocess.run(
        first.ssh_command(chain.agent_socket, inner, extra_options=["-A"]),
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )

    assert result.returncode == 0, result.stderr + first.log_text()
    assert "second-hop" in result.stdout
    requests = chain.approver_requests()
    assert len(requests) == 2
    assert requests[0]["TPMSIGNER_FORWARDED"] == "no"
    assert requests[0]["TPMSIGNER_DESTINATION_VERIFIED"] == "yes"
    assert requests[1]["TPMSIGNER_FORWARDED"] == "yes"
    assert requests[1]["TPMSIGNER_HOST_KEY_FINGERPRINT"] == host_key_fingerprint(second)
    assert requests[1]["TPMSIGNER_DESTINATION_VERIFIED"] == "no"


def test_signer_rejects_forged_binding(chain: Chain, swtpm) -> None:
    """An agent that claims a host key which did not sign the session gets nothing."""
    public_line = chain.keygen("work", PIN)
    agent_key = channel.StaticKey.generate()
    chain.tpmsigner("allow", "forger", channel.format_public_key(agent_key.public))
    chain.start_signer()
    signer_key = channel.parse_public_key(chain.tpmsigner("id").stdout)

    key_blob = asyncssh.import_public_key(public_line).public_data
    session_id = b"\x11" * 32
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    other_session_signature = host_key.sign(b"\x22" * 32, b"ssh-ed25519")
    userauth = (
        String(session_id) + Byte(50) + String("root") + String("ssh-connection") + String("publickey")
        + Boolean(True) + String("ecdsa-sha2-nistp256") + String(key_blob)
    )
    evidence = BindingEvidence(
        bind=SessionBind(host_key.public_data, session_id, other_session_signature, False),
        forwarded=False,
        host_name="trusted.example",
        name_verified=True,
    )

    async def send() -> object:
        reader, writer = await asyncio.open_connection("127.0.0.1", chain.signer_port)
        secure = await channel.initiate(reader, writer, agent_key, signer_key)
        await secure.send(encode_message(SignRequest(1, key_blob, userauth, 0, evidence=evidence)))
        reply = decode_message(await asyncio.wait_for(secure.receive(), 30))
        await secure.close()
        return reply

    reply = asyncio.run(send())

    assert isinstance(reply, Failure)
    assert "signature does not verify" in reply.message
    assert chain.approver_requests() == []


def userauth_data(session_id: bytes, key_blob: bytes, named_host_key: bytes | None = None) -> bytes:
    """Return what ssh signs to log in (RFC 4252 section 7), hostbound (OpenSSH PROTOCOL 2.5) if it names a host key."""
    method = "publickey" if named_host_key is None else "publickey-hostbound-v00@openssh.com"
    data = (
        String(session_id) + Byte(50) + String("root") + String("ssh-connection") + String(method)
        + Boolean(True) + String("ecdsa-sha2-nistp256") + String(key_blob)
    )
    return data if named_host_key is None else data + String(named_host_key)


def test_signer_rejects_binding_of_other_request(chain: Chain, tmp_path) -> None:
    """A compromised agent host sends a real binding of the allowed host with other data, and the signer rejects it."""
    public_line = chain.keygen("work", PIN)
    allowed_host = asyncssh.generate_private_key("ssh-ed25519")
    other_host = asyncssh.generate_private_key("ssh-ed25519")
    host_key_file = tmp_path / "allowed_host_key.pub"
    host_key_file.write_bytes(allowed_host.export_public_key("openssh"))
    chain.tpmsigner("restrict", "work", "--host-key", str(host_key_file))
    agent_key = channel.StaticKey.generate()
    chain.tpmsigner("allow", "compromised-host", channel.format_public_key(agent_key.public))
    chain.start_signer()
    signer_key = channel.parse_public_key(chain.tpmsigner("id").stdout)
    key_blob = asyncssh.import_public_key(public_line).public_data

    # A binding that the allowed host really signed, as the agent host
    # receives it from ssh during a real login there.
    bound_session = b"\x11" * 32
    evidence = BindingEvidence(
        bind=SessionBind(allowed_host.public_data, bound_session, allowed_host.sign(bound_session, b"ssh-ed25519"), False),
        forwarded=False,
        host_name="allowed.example",
        name_verified=True,
    )
    requests = {
        "another session": SignRequest(1, key_blob, userauth_data(b"\x22" * 32, key_blob), 0, evidence=evidence),
        "another host key named": SignRequest(
            2, key_blob, userauth_data(bound_session, key_blob, other_host.public_data), 0, evidence=evidence
        ),
        "not a login": SignRequest(3, key_blob, b"data that is not a userauth request", 0, evidence=evidence),
        "no binding": SignRequest(4, key_blob, userauth_data(bound_session, key_blob), 0),
        # Control: the same binding with the request it belongs to reaches the approver and is signed.
        "matching": SignRequest(5, key_blob, userauth_data(bound_session, key_blob), 0, evidence=evidence),
    }

    async def send_all() -> dict[str, object]:
        reader, writer = await asyncio.open_connection("127.0.0.1", chain.signer_port)
        secure = await channel.initiate(reader, writer, agent_key, signer_key)
        try:
            replies = {}
            for case, request in requests.items():
                await secure.send(encode_message(request))
                replies[case] = decode_message(await asyncio.wait_for(secure.receive(), 30))
            return replies
        finally:
            await secure.close()

    replies = asyncio.run(send_all())

    assert isinstance(replies["another session"], Failure)
    assert "for another session than the userauth request" in replies["another session"].message
    assert isinstance(replies["another host key named"], Failure)
    assert "names another host key than the session binding" in replies["another host key named"].message
    assert isinstance(replies["not a login"], Failure)
    assert "with a request that is not a login" in replies["not a login"].message
    assert isinstance(replies["no binding"], Failure)
    assert "restricted to other hosts" in replies["no binding"].message
    assert isinstance(replies["matching"], SignReply)
    assert asyncssh.import_public_key(public_line).verify(requests["matching"].data, replies["matching"].signature)
    assert len(chain.approver_requests()) == 1
    assert chain.approver_requests()[0]["TPMSIGNER_DESTINATION"] == "root@allowed.example"


def test_restricted_identity_signs_only_for_listed_host(chain: Chain, sshd_factory) -> None:
    public_line = start(chain)
    allowed = sshd_factory(authorized_keys=[public_line])
    other = sshd_factory(authorized_keys=[public_line])
    chain.tpmsigner("restrict", "work", "--host-key", str(allowed.host_key) + ".pub")

    to_other = login(chain, other)
    to_allowed = login(chain, allowed)

    assert to_other.returncode == 255
    assert to_allowed.returncode == 0, to_allowed.stderr
    assert len(chain.approver_requests()) == 1
    assert chain.signer is not None
    assert "may only log in to the host keys listed with 'tpmsigner restrict' (1)" in chain.signer.log_text()
    shown = chain.tpmsigner("show", "work").stdout
    assert host_key_fingerprint(allowed) in shown


def test_restricted_identity_refuses_other_purposes(chain: Chain, sshd_factory) -> None:
    public_line = start(chain)
    allowed = sshd_factory(authorized_keys=[public_line])
    chain.tpmsigner("restrict", "work", "--host-key", str(allowed.host_key) + ".pub")

    async def sign() -> bytes:
        async with asyncssh.connect_agent(str(chain.agent_socket)) as agent:
            keys = await agent.get_keys()
            return await keys[0].sign_async(b"not a login")

    with pytest.raises(ValueError, match="Unable to sign"):
        asyncio.run(asyncio.wait_for(sign(), 30))
    assert chain.approver_requests() == []

    chain.tpmsigner("unrestrict", "work")
    assert asyncssh.import_public_key(public_line).verify(b"not a login", asyncio.run(asyncio.wait_for(sign(), 30)))


def test_restrict_rejects_private_host_key(chain: Chain, sshd_factory) -> None:
    public_line = chain.keygen("work", "2468-restrict")
    host = sshd_factory(authorized_keys=[public_line])

    result = chain.tpmsigner("restrict", "work", "--host-key", str(host.host_key), check=False)

    assert result.returncode == 1
    assert f"{host.host_key} is a private key or a PEM file, not an OpenSSH public key line" in result.stderr
    assert "Traceback" not in result.stderr
    assert "only for host:" not in chain.tpmsigner("show", "work").stdout
