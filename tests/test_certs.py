"""SSH user certificates through the whole chain, against real OpenSSH.

A CA made with ``ssh-keygen -t ed25519`` signs the identity's public key
with ``ssh-keygen -s``; ``tpmsigner cert add`` stores the certificate; the
agent then lists the key and the certificate.  One sshd trusts only the CA
(``TrustedUserCAKeys``, empty authorized_keys), another only the plain key.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import paramiko
import pytest
from asyncssh.packet import String

from tests.support.chain import Chain
from tests.support.ssh_keys import generate_key_pair

PIN = "4711-certificates"
# A validity interval that ended long ago, for an expired certificate.
PAST_VALIDITY = "20200101000000Z:20200102000000Z"


@dataclass(frozen=True)
class CertificateAuthority:
    """An ed25519 CA key made with ssh-keygen, signing with ssh-keygen -s."""

    key: Path
    workdir: Path

    @property
    def public_key_file(self) -> Path:
        return self.key.with_name(self.key.name + ".pub")

    def sign(self, public_line: str, name: str, key_id: str, principal: str, *options: str) -> Path:
        """Certify ``public_line`` and return the -cert.pub file; ``name`` keeps each call's files apart."""
        public_file = self.workdir / f"{name}.pub"
        public_file.write_text(public_line + "\n")
        subprocess.run(
            ["ssh-keygen", "-q", "-s", str(self.key), "-I", key_id, "-n", principal, *options, str(public_file)],
            check=True,
            capture_output=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        return self.workdir / f"{name}-cert.pub"


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    workdir = tmp_path / "ca"
    pair = generate_key_pair(workdir / "ca", "ed25519", "test-ca")
    return CertificateAuthority(pair.private_key, workdir)


def keygen(chain: Chain, label: str, key_type: str) -> str:
    """Create an identity of ``key_type`` in the TPM and return its public key line."""
    pin_file = chain.workdir / f"{label}.pin"
    pin_file.write_text(PIN + "\n")
    result = chain.tpmsigner("keygen", label, "--type", key_type, "--pin-file", str(pin_file), timeout=180)
    chain.set_approver_pin(PIN)
    return result.stdout.strip()


def start_chain(chain: Chain) -> None:
    chain.pair()
    chain.start_signer()
    chain.start_agent()


def certificate_line(path: Path, comment: str) -> str:
    """The line an agent lists for a certificate: type, base64, and the identity's label."""
    key_type, encoded = path.read_text().split()[:2]
    return f"{key_type} {encoded} {comment}"


def cert_add(chain: Chain, label: str, path: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return chain.tpmsigner("cert", "add", label, str(path), check=check)


def show_json(chain: Chain, label: str) -> dict:
    return json.loads(chain.tpmsigner("show", label, "--json").stdout)


def login(chain: Chain, sshd) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sshd.ssh_command(chain.agent_socket, "echo logged-in"),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def ca_only_sshd(sshd_factory, ca: CertificateAuthority):
    return sshd_factory(authorized_keys=[], extra_config=[f"TrustedUserCAKeys {ca.public_key_file}"])


def fingerprint_by_ssh_keygen(path: Path) -> str:
    result = subprocess.run(["ssh-keygen", "-lf", str(path)], capture_output=True, text=True, check=True, timeout=30)
    return result.stdout.split()[1]


def test_agent_lists_key_then_certificate(chain: Chain, ca: CertificateAuthority, sshd_factory) -> None:
    public_line = keygen(chain, "work", "ecdsa-p256")
    certificate_file = ca.sign(public_line, "work", "work-id", "alice")
    added = cert_add(chain, "work", certificate_file)
    start_chain(chain)

    listed = chain.ssh_add("-L")
    fingerprints = chain.ssh_add("-l")

    assert "added the certificate to identity 'work': key id 'work-id'" in added.stderr
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [public_line, certificate_line(certificate_file, "work")]
    key_fingerprint = fingerprint_by_ssh_keygen(certificate_file)
    assert fingerprints.stdout.splitlines() == [
        f"256 {key_fingerprint} work (ECDSA)",
        f"256 {key_fingerprint} work (ECDSA-CERT)",
    ]


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "rsa-2048"])
def test_certificate_login_to_ca_only_sshd(
    chain: Chain, ca: CertificateAuthority, sshd_factory, key_type: str
) -> None:
    public_line = keygen(chain, "work", key_type)
    ca_sshd = ca_only_sshd(sshd_factory, ca)
    key_sshd = sshd_factory(authorized_keys=[public_line])
    cert_add(chain, "work", ca.sign(public_line, "work", "work-id", ca_sshd.user, "-z", "17"))
    start_chain(chain)

    by_certificate = login(chain, ca_sshd)
    by_key = login(chain, key_sshd)

    assert by_certificate.returncode == 0, by_certificate.stderr
    assert by_certificate.stdout.strip() == "logged-in"
    assert by_key.returncode == 0, by_key.stderr
    # ssh offers the key first; only the server that accepts it asks for a
    # signature, so each login needed exactly one approval.
    certificate_request, key_request = chain.approver_requests()
    assert certificate_request["TPMSIGNER_CERTIFICATE"] == "yes"
    assert certificate_request["TPMSIGNER_CERTIFICATE_KEY_ID"] == "work-id"
    assert certificate_request["TPMSIGNER_CERTIFICATE_STATUS"] == "valid"
    assert certificate_request["TPMSIGNER_PURPOSE"] == "ssh-login"
    assert certificate_request["TPMSIGNER_DESTINATION"] == f"{ca_sshd.user}@127.0.0.1"
    assert certificate_request["TPMSIGNER_DESTINATION_VERIFIED"] == "yes"
    assert key_request["TPMSIGNER_CERTIFICATE"] == "no"
    assert key_request["TPMSIGNER_CERTIFICATE_KEY_ID"] == ""
    assert "Accepted certificate ID \"work-id\" (serial 17)" in ca_sshd.log_text()

    audit = [json.loads(line) for line in chain.signer_audit_log.read_text().splitlines()]
    assert [entry.get("certificate") for entry in audit] == [{"key_id": "work-id", "serial": 17}, None]
    assert audit[0]["key_fingerprint"] == audit[1]["key_fingerprint"] == show_json(chain, "work")["fingerprint"]


def test_renewed_certificate_replaces_old(chain: Chain, ca: CertificateAuthority, sshd_factory) -> None:
    public_line = keygen(chain, "work", "ecdsa-p256")
    ca_sshd = ca_only_sshd(sshd_factory, ca)
    first = ca.sign(public_line, "first", "first-id", ca_sshd.user, "-z", "1")
    cert_add(chain, "work", first)
    start_chain(chain)
    assert chain.ssh_add("-L").stdout.splitlines()[1] == certificate_line(first, "work")

    renewed = ca.sign(public_line, "renewed", "renewed-id", ca_sshd.user, "-z", "2")
    replaced = cert_add(chain, "work", renewed)
    again = cert_add(chain, "work", renewed)

    assert "replaced the certificate of identity 'work' (key id 'first-id', serial 1" in replaced.stderr
    assert "already has this certificate; nothing changed" in again.stderr
    assert chain.ssh_add("-L").stdout.splitlines() == [public_line, certificate_line(renewed, "work")]
    shown = show_json(chain, "work")["certificate"]
    assert shown["key_id"] == "renewed-id"
    assert shown["serial"] == 2
    result = login(chain, ca_sshd)
    assert result.returncode == 0, result.stderr
    assert chain.approver_requests()[0]["TPMSIGNER_CERTIFICATE_KEY_ID"] == "renewed-id"


def test_expired_certificate_listed_and_flagged(
    chain: Chain, ca: CertificateAuthority, sshd_factory
) -> None:
    public_line = keygen(chain, "work", "ecdsa-p256")
    ca_sshd = ca_only_sshd(sshd_factory, ca)
    key_sshd = sshd_factory(authorized_keys=[public_line])
    expired = ca.sign(public_line, "expired", "old-id", ca_sshd.user, "-V", PAST_VALIDITY)
    added = cert_add(chain, "work", expired)
    start_chain(chain)

    listed = chain.ssh_add("-L").stdout.splitlines()
    shown = show_json(chain, "work")["certificate"]
    shown_text = chain.tpmsigner("show", "work").stdout
    listing_text = chain.tpmsigner("list").stdout
    to_ca_sshd = login(chain, ca_sshd)
    to_key_sshd = login(chain, key_sshd)

    assert "this certificate has expired" in added.stderr
    assert listed == [public_line, certificate_line(expired, "work")]
    assert shown["status"] == "expired"
    assert shown["expired"] is True
    assert shown["not_yet_valid"] is False
    assert shown["valid_before"] == "2020-01-02T00:00:00+00:00"
    assert "EXPIRED" in shown_text
    assert "certificate expired" in listing_text
    assert to_ca_sshd.returncode == 255
    assert "logged-in" not in to_ca_sshd.stdout
    assert "Certificate invalid: expired" in ca_sshd.log_text()
    assert to_key_sshd.returncode == 0, to_key_sshd.stderr
    # sshd rejected the expired certificate before asking for a signature.
    assert [request["TPMSIGNER_CERTIFICATE"] for request in chain.approver_requests()] == ["no"]


def test_not_yet_valid_certificate_is_flagged(chain: Chain, ca: CertificateAuthority) -> None:
    public_line = keygen(chain, "work", "ecdsa-p256")
    future = ca.sign(public_line, "future", "future-id", "alice", "-V", "+52w:+104w")

    added = cert_add(chain, "work", future)

    assert "this certificate is not valid yet" in added.stderr
    shown = show_json(chain, "work")["certificate"]
    assert shown["status"] == "not yet valid"
    assert shown["not_yet_valid"] is True
    assert "NOT YET VALID" in chain.tpmsigner("show", "work").stdout


def test_show_prints_certificate_fields(chain: Chain, ca: CertificateAuthority) -> None:
    public_line = keygen(chain, "work", "ecdsa-p256")
    certificate_file = ca.sign(
        public_line, "work", "alice@example", "alice,deploy", "-z", "99",
        "-V", "20300101000000Z:20300201000000Z", "-O", "force-command=/usr/bin/true", "-O", "clear",
        "-O", "permit-pty",
    )  # fmt: skip
    cert_add(chain, "work", certificate_file)

    shown = show_json(chain, "work")
    listed = json.loads(chain.tpmsigner("list", "--json").stdout)
    text = chain.tpmsigner("show", "work").stdout

    certificate = shown["certificate"]
    assert certificate["type"] == "ecdsa-sha2-nistp256-cert-v01@openssh.com"
    assert certificate["kind"] == "user"
    assert certificate["certificate"] == certificate_line(certificate_file, "work")
    assert certificate["key_id"] == "alice@example"
    assert certificate["serial"] == 99
    assert certificate["principals"] == ["alice", "deploy"]
    assert certificate["valid_after"] == "2030-01-01T00:00:00+00:00"
    assert certificate["valid_before"] == "2030-02-01T00:00:00+00:00"
    assert certificate["ca_key_type"] == "ssh-ed25519"
    assert certificate["ca_fingerprint"] == fingerprint_by_ssh_keygen(ca.public_key_file)
    assert certificate["signature_algorithm"] == "ssh-ed25519"
    assert certificate["critical_options"] == {"force-command": "/usr/bin/true"}
    assert certificate["extensions"] == {"permit-pty": ""}
    assert listed == [shown]
    assert "key id:" in text
    assert "alice@example" in text
    assert "alice, deploy" in text
    assert "force-command /usr/bin/true" in text
    assert fingerprint_by_ssh_keygen(ca.public_key_file) in text


def test_certificate_of_another_key_is_rejected(chain: Chain, ca: CertificateAuthority, tmp_path: Path) -> None:
    keygen(chain, "work", "ecdsa-p256")
    other = generate_key_pair(tmp_path / "other", "ecdsa", "other")
    certificate_file = ca.sign(other.public_key_line, "other", "other-id", "alice")

    result = cert_add(chain, "work", certificate_file, check=False)

    assert result.returncode == 1
    assert f"is for the key {fingerprint_by_ssh_keygen(other.public_key_file)}, not for identity 'work'" in result.stderr
    assert "tpmsigner show work" in result.stderr
    assert show_json(chain, "work")["certificate"] is None


def test_host_certificate_is_rejected(chain: Chain, ca: CertificateAuthority) -> None:
    public_line = keygen(chain, "work", "ecdsa-p256")
    certificate_file = ca.sign(public_line, "host", "host-id", "server.example", "-h")

    result = cert_add(chain, "work", certificate_file, check=False)

    assert result.returncode == 1
    assert "is a host certificate; an identity needs a user certificate" in result.stderr
    assert show_json(chain, "work")["certificate"] is None


def test_plain_key_file_and_damaged_certificate_are_rejected(chain: Chain, ca: CertificateAuthority) -> None:
    public_line = keygen(chain, "work", "ecdsa-p256")
    key_file = chain.workdir / "work.pub"
    key_file.write_text(public_line + "\n")
    certificate_file = ca.sign(public_line, "work", "work-id", "alice")
    key_type, encoded, comment = certificate_file.read_text().split()
    blob = bytearray(base64.b64decode(encoded))
    blob[-1] ^= 0x01
    damaged = chain.workdir / "damaged-cert.pub"
    damaged.write_text(f"{key_type} {base64.b64encode(bytes(blob)).decode()} {comment}\n")

    plain = cert_add(chain, "work", key_file, check=False)
    altered = cert_add(chain, "work", damaged, check=False)

    assert plain.returncode == 1
    assert "contains a ecdsa-sha2-nistp256 public key, not a certificate" in plain.stderr
    assert altered.returncode == 1
    assert "does not verify with its CA key" in altered.stderr


def test_cert_remove_removes_it_from_listings(chain: Chain, ca: CertificateAuthority) -> None:
    public_line = keygen(chain, "work", "ecdsa-p256")
    cert_add(chain, "work", ca.sign(public_line, "work", "work-id", "alice"))
    start_chain(chain)
    assert len(chain.ssh_add("-L").stdout.splitlines()) == 2

    removed = chain.tpmsigner("cert", "remove", "work")
    listed = chain.ssh_add("-L").stdout.splitlines()
    again = chain.tpmsigner("cert", "remove", "work", check=False)

    assert "removed the certificate (key id 'work-id'" in removed.stderr
    assert listed == [public_line]
    assert show_json(chain, "work")["certificate"] is None
    assert again.returncode == 1
    assert "identity 'work' has no certificate" in again.stderr


def test_disabled_identity_hides_its_certificate(chain: Chain, ca: CertificateAuthority) -> None:
    public_line = keygen(chain, "work", "ecdsa-p256")
    certificate_file = ca.sign(public_line, "work", "work-id", "alice")
    cert_add(chain, "work", certificate_file)
    start_chain(chain)
    assert chain.ssh_add("-L").stdout.splitlines()[1] == certificate_line(certificate_file, "work")

    chain.tpmsigner("disable", "work")
    hidden = chain.ssh_add("-L").stdout

    async def sign_with_certificate() -> bytes:
        async with asyncssh.connect_agent(str(chain.agent_socket)) as agent:
            certificate = asyncssh.import_certificate(certificate_file.read_text())
            keypair = asyncssh.agent.SSHAgentKeyPair(
                agent, certificate.algorithm, certificate.public_data, b"work"
            )
            return await keypair.sign_async(b"disabled")

    assert "ecdsa" not in hidden
    with pytest.raises(ValueError, match="Unable to sign"):
        asyncio.run(asyncio.wait_for(sign_with_certificate(), 30))
    assert chain.approver_requests() == []
    assert chain.signer is not None
    assert "names disabled key 'work'" in chain.signer.log_text()


def test_agent_clients_list_certificate_and_sign_with_it(chain: Chain, ca: CertificateAuthority, monkeypatch) -> None:
    public_line = keygen(chain, "work", "ecdsa-p256")
    certificate_file = ca.sign(public_line, "work", "work-id", "alice")
    cert_add(chain, "work", certificate_file)
    start_chain(chain)
    certificate_blob = base64.b64decode(certificate_file.read_text().split()[1])

    async def list_and_sign() -> tuple[list[asyncssh.SSHKeyPair], bytes]:
        async with asyncssh.connect_agent(str(chain.agent_socket)) as agent:
            keys = await agent.get_keys()
            return keys, await keys[1].sign_async(b"asyncssh payload")

    keys, signature = asyncio.run(asyncio.wait_for(list_and_sign(), 60))
    monkeypatch.setenv("SSH_AUTH_SOCK", str(chain.agent_socket))
    paramiko_agent = paramiko.Agent()
    try:
        paramiko_keys = [(key.get_name(), key.asbytes(), key.comment) for key in paramiko_agent.get_keys()]
    finally:
        paramiko_agent.close()

    public_key = asyncssh.import_public_key(public_line)
    assert [key.algorithm for key in keys] == [b"ecdsa-sha2-nistp256", b"ecdsa-sha2-nistp256-cert-v01@openssh.com"]
    assert keys[1].public_data == certificate_blob
    assert [key.get_comment() for key in keys] == ["work", "work"]
    # The signature is the plain key's (PROTOCOL.certkeys).
    assert public_key.verify(b"asyncssh payload", signature)
    assert chain.approver_requests()[0]["TPMSIGNER_CERTIFICATE_KEY_ID"] == "work-id"
    assert paramiko_keys == [
        ("ecdsa-sha2-nistp256", public_key.public_data, "work"),
        ("ecdsa-sha2-nistp256-cert-v01@openssh.com", certificate_blob, "work"),
    ]


def test_restricted_certificate_login_only_to_listed_host(
    chain: Chain, ca: CertificateAuthority, sshd_factory
) -> None:
    public_line = keygen(chain, "work", "ecdsa-p256")
    allowed = ca_only_sshd(sshd_factory, ca)
    other = ca_only_sshd(sshd_factory, ca)
    cert_add(chain, "work", ca.sign(public_line, "work", "work-id", allowed.user))
    chain.tpmsigner("restrict", "work", "--host-key", str(allowed.host_key) + ".pub")
    start_chain(chain)

    to_other = login(chain, other)
    to_allowed = login(chain, allowed)

    assert to_other.returncode == 255
    assert to_allowed.returncode == 0, to_allowed.stderr
    assert len(chain.approver_requests()) == 1
    assert chain.approver_requests()[0]["TPMSIGNER_CERTIFICATE"] == "yes"
    assert chain.signer is not None
    assert "may only log in to the host keys listed with 'tpmsigner restrict' (1)" in chain.signer.log_text()


def test_certificate_file_on_the_agent_host_is_shown(chain: Chain, ca: CertificateAuthority, sshd_factory) -> None:
    # The signer does not store this certificate: ssh reads it from a file
    # and pairs it with the agent's key (ssh's CertificateFile option).
    public_line = keygen(chain, "work", "ecdsa-p256")
    ca_sshd = ca_only_sshd(sshd_factory, ca)
    certificate_file = ca.sign(public_line, "local", "local-id", ca_sshd.user)
    start_chain(chain)
    argv = ca_sshd.ssh_command(
        chain.agent_socket, "echo logged-in", extra_options=["-o", f"CertificateFile={certificate_file}"]
    )

    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    assert result.returncode == 0, result.stderr
    assert chain.ssh_add("-L").stdout.splitlines() == [public_line]
    seen = chain.approver_requests()[0]
    assert seen["TPMSIGNER_CERTIFICATE"] == "yes"
    assert seen["TPMSIGNER_CERTIFICATE_KEY_ID"] == "local-id"
    assert seen["TPMSIGNER_DESTINATION_VERIFIED"] == "yes"


def test_login_offering_an_altered_certificate_is_rejected(chain: Chain, ca: CertificateAuthority) -> None:
    public_line = keygen(chain, "work", "ecdsa-p256")
    certificate_file = ca.sign(public_line, "work", "honest-id", "alice")
    start_chain(chain)
    certificate_blob = base64.b64decode(certificate_file.read_text().split()[1])
    altered = certificate_blob.replace(b"honest-id", b"forged-id", 1)
    assert altered != certificate_blob
    # RFC 4252 section 7: what ssh would sign to log in with the altered
    # certificate; a client that verified the certificate would never send it.
    userauth = (
        String(b"\x42" * 32)
        + bytes([50])
        + String("alice")
        + String("ssh-connection")
        + String("publickey")
        + b"\x01"
        + String("ecdsa-sha2-nistp256-cert-v01@openssh.com")
        + String(altered)
    )

    async def sign() -> bytes:
        async with asyncssh.connect_agent(str(chain.agent_socket)) as agent:
            keys = await agent.get_keys()
            return await keys[0].sign_async(userauth)

    with pytest.raises(ValueError, match="Unable to sign"):
        asyncio.run(asyncio.wait_for(sign(), 30))
    assert chain.approver_requests() == []
    assert chain.signer is not None
    assert "the login offers an invalid certificate" in chain.signer.log_text()
