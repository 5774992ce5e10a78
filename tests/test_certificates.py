"""The OpenSSH certificate parser, against certificates that ssh-keygen -s makes.

ssh-keygen does not make some invalid certificates: a duplicated option, a
certificate as CA key, too many principals.  ``build_certificate`` encodes
those and signs them with an asyncssh CA key, so that each one reaches its
own check instead of failing at the signature.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import asyncssh
import pytest
from asyncssh.packet import SSHPacket, String, UInt32, UInt64

from tpmsigner.errors import CertificateError
from tpmsigner.protocol.certificates import (
    EXPIRED,
    MAX_CERTIFICATE_SIZE,
    MAX_PRINCIPALS,
    NOT_YET_VALID,
    SSH_CERT_TYPE_HOST,
    SSH_CERT_TYPE_USER,
    VALID,
    VALID_ALWAYS,
    VALID_FOREVER,
    decode_certificate,
    format_validity_time,
    is_certificate_blob,
    parse_certificate_line,
)
from tpmsigner.protocol.signeddata import PURPOSE_SSH_LOGIN, describe_signed_data
from tpmsigner.protocol.sshkeys import certified_key_blob, fingerprint_of_blob
from tests.support.ssh_keys import generate_key_pair

ECDSA_CERTIFICATE_TYPE = "ecdsa-sha2-nistp256-cert-v01@openssh.com"


def keygen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh-keygen", *args], check=True, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )


def sign_with_ssh_keygen(ca: Path, public_key: Path, *options: str) -> Path:
    """Run ``ssh-keygen -s CA OPTIONS PUBLIC_KEY`` and return the -cert.pub file it writes."""
    keygen("-q", "-s", str(ca), *options, str(public_key))
    return public_key.with_name(public_key.name.removesuffix(".pub") + "-cert.pub")


def blob_of_line(line: str) -> bytes:
    return base64.b64decode(line.split()[1])


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    return generate_key_pair(tmp_path / "ca", "ed25519", "test-ca").private_key


@pytest.fixture
def user_key(tmp_path: Path) -> Path:
    return generate_key_pair(tmp_path / "user", "ecdsa", "user").public_key_file


def build_certificate(
    ca_key: asyncssh.SSHKey,
    key: asyncssh.SSHKey,
    *,
    principals: tuple[str, ...] = ("alice",),
    options: tuple[tuple[str, bytes], ...] = (),
    kind: int = SSH_CERT_TYPE_USER,
    ca_blob: bytes | None = None,
) -> bytes:
    """Encode an ECDSA P-256 certificate field by field (PROTOCOL.certkeys) and sign it with ``ca_key``."""
    key_packet = SSHPacket(key.public_data)
    key_packet.get_string()
    body = (
        String(ECDSA_CERTIFICATE_TYPE)
        + String(b"\x01" * 32)
        + key_packet.get_remaining_payload()
        + UInt64(7)
        + UInt32(kind)
        + String("built-by-test")
        + String(b"".join(String(principal) for principal in principals))
        + UInt64(VALID_ALWAYS)
        + UInt64(VALID_FOREVER)
        + String(b"".join(String(name) + String(data) for name, data in options))
        + String(b"")
        + String(b"")
        + String(ca_key.public_data if ca_blob is None else ca_blob)
    )
    return body + String(ca_key.sign(body, ca_key.sig_algorithms[0]))


def test_fields_match_ssh_keygen(ca: Path, user_key: Path) -> None:
    certificate_file = sign_with_ssh_keygen(
        ca, user_key, "-I", "alice@example", "-n", "alice,deploy", "-z", "42",
        "-V", "20300101000000Z:20300201000000Z", "-O", "force-command=/usr/bin/true", "-O", "no-pty",
    )  # fmt: skip

    certificate = parse_certificate_line(certificate_file.read_text(), str(certificate_file))

    assert certificate.certificate_type == ECDSA_CERTIFICATE_TYPE
    assert certificate.kind == SSH_CERT_TYPE_USER
    assert certificate.is_user_certificate
    assert certificate.key_id == "alice@example"
    assert certificate.serial == 42
    assert certificate.principals == ("alice", "deploy")
    assert format_validity_time(certificate.valid_after, VALID_ALWAYS) == "2030-01-01T00:00:00+00:00"
    assert format_validity_time(certificate.valid_before, VALID_FOREVER) == "2030-02-01T00:00:00+00:00"
    assert [(option.name, option.value) for option in certificate.critical_options] == [
        ("force-command", "/usr/bin/true")
    ]
    # -O no-pty removes permit-pty from ssh-keygen's default extensions.
    assert [extension.name for extension in certificate.extensions] == [
        "permit-X11-forwarding",
        "permit-agent-forwarding",
        "permit-port-forwarding",
        "permit-user-rc",
    ]
    assert certificate.signature_algorithm == "ssh-ed25519"
    assert certificate.ca_key_type == "ssh-ed25519"


def test_certified_key_and_fingerprints_match_ssh_keygen(ca: Path, user_key: Path) -> None:
    certificate_file = sign_with_ssh_keygen(ca, user_key, "-I", "id", "-n", "alice")
    certificate = parse_certificate_line(certificate_file.read_text(), "test")

    ca_fingerprint = keygen("-lf", str(ca) + ".pub").stdout.split()[1]
    certificate_fingerprint = keygen("-lf", str(certificate_file)).stdout.split()[1]

    assert certificate.key_blob == blob_of_line(user_key.read_text())
    assert certified_key_blob(certificate.blob) == certificate.key_blob
    assert certificate.ca_fingerprint == ca_fingerprint
    # ssh-keygen -l prints the certified key's fingerprint for a certificate.
    assert fingerprint_of_blob(certificate.blob) == certificate_fingerprint
    assert fingerprint_of_blob(certificate.key_blob) == certificate_fingerprint
    assert is_certificate_blob(certificate.blob)
    assert not is_certificate_blob(certificate.key_blob)


def test_openssh_line_round_trips(ca: Path, user_key: Path) -> None:
    certificate_file = sign_with_ssh_keygen(ca, user_key, "-I", "id", "-n", "alice")
    line = certificate_file.read_text().strip()
    certificate = parse_certificate_line(line, "test")

    assert certificate.openssh_line("user") == line


def test_rsa_certificate_is_parsed(tmp_path: Path, ca: Path) -> None:
    rsa_key = generate_key_pair(tmp_path / "rsa", "rsa", "rsa-user").public_key_file
    certificate_file = sign_with_ssh_keygen(ca, rsa_key, "-I", "rsa-id", "-n", "alice")

    certificate = parse_certificate_line(certificate_file.read_text(), "test")

    assert certificate.certificate_type == "ssh-rsa-cert-v01@openssh.com"
    assert certificate.key_blob == blob_of_line(rsa_key.read_text())


def test_rsa_ca_signature_algorithm_is_reported(tmp_path: Path, user_key: Path) -> None:
    rsa_ca = generate_key_pair(tmp_path / "rsa-ca", "rsa", "rsa-ca").private_key
    certificate_file = sign_with_ssh_keygen(rsa_ca, user_key, "-I", "id", "-n", "alice", "-t", "rsa-sha2-256")

    certificate = parse_certificate_line(certificate_file.read_text(), "test")

    assert certificate.signature_algorithm == "rsa-sha2-256"
    assert certificate.ca_key_type == "ssh-rsa"


def test_host_certificate_is_parsed_as_host(ca: Path, user_key: Path) -> None:
    certificate_file = sign_with_ssh_keygen(ca, user_key, "-h", "-I", "host", "-n", "server.example")

    certificate = parse_certificate_line(certificate_file.read_text(), "test")

    assert certificate.kind == SSH_CERT_TYPE_HOST
    assert not certificate.is_user_certificate
    assert certificate.kind_name == "host"


def test_certificate_made_by_asyncssh_is_parsed() -> None:
    ca_key = asyncssh.generate_private_key("ssh-ed25519")
    user = asyncssh.generate_private_key("ecdsa-sha2-nistp256")
    made = ca_key.generate_user_certificate(user, "asyncssh-id", principals=["bob"], force_command="uptime")

    certificate = decode_certificate(made.public_data)

    assert certificate.key_id == "asyncssh-id"
    assert certificate.principals == ("bob",)
    assert certificate.key_blob == user.public_data
    assert {option.name: option.value for option in certificate.critical_options} == {"force-command": "uptime"}


@pytest.mark.parametrize(
    ("validity", "now_offset", "expected"),
    [
        ("20300101000000Z:20300201000000Z", 0, VALID),
        ("20300101000000Z:20300201000000Z", -1, NOT_YET_VALID),
        ("20300101000000Z:20300201000000Z", 31 * 86400, EXPIRED),
        ("20300101000000Z:20300201000000Z", 31 * 86400 - 1, VALID),
    ],
)
def test_validity_at_the_edges(ca: Path, user_key: Path, validity: str, now_offset: int, expected: str) -> None:
    certificate_file = sign_with_ssh_keygen(ca, user_key, "-I", "id", "-n", "alice", "-V", validity)
    certificate = parse_certificate_line(certificate_file.read_text(), "test")

    assert certificate.validity(certificate.valid_after + now_offset) == expected


def test_forever_certificate_has_no_bounds(ca: Path, user_key: Path) -> None:
    certificate_file = sign_with_ssh_keygen(ca, user_key, "-I", "id", "-n", "alice", "-V", "always:forever")
    certificate = parse_certificate_line(certificate_file.read_text(), "test")

    display = certificate.to_display(2.0e9, "user")

    assert certificate.valid_after == VALID_ALWAYS
    assert certificate.valid_before == VALID_FOREVER
    assert display["valid_after"] is None
    assert display["valid_before"] is None
    assert display["status"] == VALID


def test_times_after_year_9999_are_clamped() -> None:
    assert format_validity_time(2**63, VALID_FOREVER) == "9999-12-31T23:59:59+00:00"


def test_altered_certificate_fails_its_signature(ca: Path, user_key: Path) -> None:
    certificate_file = sign_with_ssh_keygen(ca, user_key, "-I", "alice", "-n", "alice")
    blob = blob_of_line(certificate_file.read_text())
    altered = blob.replace(b"\x00\x00\x00\x05alice", b"\x00\x00\x00\x05mallo", 1)
    assert altered != blob

    with pytest.raises(CertificateError, match="does not verify"):
        decode_certificate(altered)


@pytest.mark.parametrize("cut", ["truncated", "trailing"])
def test_malformed_blob_is_rejected(ca: Path, user_key: Path, cut: str) -> None:
    certificate_file = sign_with_ssh_keygen(ca, user_key, "-I", "id", "-n", "alice")
    blob = blob_of_line(certificate_file.read_text())
    damaged = blob[:-10] if cut == "truncated" else blob + b"\x00"

    with pytest.raises(CertificateError, match="malformed OpenSSH certificate"):
        decode_certificate(damaged)


def test_ed25519_certificate_is_unsupported(tmp_path: Path, ca: Path) -> None:
    ed25519_key = generate_key_pair(tmp_path / "ed", "ed25519", "ed").public_key_file
    certificate_file = sign_with_ssh_keygen(ca, ed25519_key, "-I", "id", "-n", "alice")

    with pytest.raises(CertificateError, match="unsupported certificate type ssh-ed25519-cert-v01@openssh.com"):
        parse_certificate_line(certificate_file.read_text(), "test")


def test_plain_public_key_is_not_a_certificate(user_key: Path) -> None:
    with pytest.raises(CertificateError, match="ecdsa-sha2-nistp256 public key, not a certificate"):
        parse_certificate_line(user_key.read_text(), "user.pub")


def test_line_type_must_match_blob(tmp_path: Path, ca: Path) -> None:
    rsa_key = generate_key_pair(tmp_path / "rsa", "rsa", "rsa").public_key_file
    certificate_file = sign_with_ssh_keygen(ca, rsa_key, "-I", "id", "-n", "alice")
    relabelled = ECDSA_CERTIFICATE_TYPE + " " + certificate_file.read_text().split(None, 1)[1]

    with pytest.raises(CertificateError, match="the line names type ecdsa-sha2-nistp256-cert-v01@openssh.com"):
        parse_certificate_line(relabelled, "test")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        (ECDSA_CERTIFICATE_TYPE + "\n", "expected 'TYPE BASE64"),
        (ECDSA_CERTIFICATE_TYPE + " not*base64 comment\n", "not valid base64"),
    ],
)
def test_bad_lines_are_rejected(text: str, message: str) -> None:
    with pytest.raises(CertificateError, match=message):
        parse_certificate_line(text, "test")


def test_duplicated_option_is_rejected() -> None:
    ca_key = asyncssh.generate_private_key("ssh-ed25519")
    user = asyncssh.generate_private_key("ecdsa-sha2-nistp256")
    force = String("/bin/true")
    blob = build_certificate(ca_key, user, options=(("force-command", force), ("force-command", force)))

    with pytest.raises(CertificateError, match="critical option 'force-command' twice"):
        decode_certificate(blob)


def test_built_certificate_passes_when_valid() -> None:
    # The builder itself makes certificates that parse, so the failures
    # above come from the one field each test changes.
    ca_key = asyncssh.generate_private_key("ssh-ed25519")
    user = asyncssh.generate_private_key("ecdsa-sha2-nistp256")

    certificate = decode_certificate(build_certificate(ca_key, user, options=(("no-touch-required", b""),)))

    assert certificate.key_id == "built-by-test"
    assert certificate.key_blob == user.public_data
    assert certificate.critical_options[0].value == ""


def test_too_many_principals_are_rejected() -> None:
    ca_key = asyncssh.generate_private_key("ssh-ed25519")
    user = asyncssh.generate_private_key("ecdsa-sha2-nistp256")
    principals = tuple(f"user{number}" for number in range(MAX_PRINCIPALS + 1))

    with pytest.raises(CertificateError, match=f"more than {MAX_PRINCIPALS} principals"):
        decode_certificate(build_certificate(ca_key, user, principals=principals))


def test_certificate_as_ca_key_is_rejected() -> None:
    ca_key = asyncssh.generate_private_key("ssh-ed25519")
    user = asyncssh.generate_private_key("ecdsa-sha2-nistp256")
    ca_certificate = ca_key.generate_user_certificate(ca_key, "ca-as-cert").public_data

    with pytest.raises(CertificateError, match="signed by another certificate"):
        decode_certificate(build_certificate(ca_key, user, ca_blob=ca_certificate))


def test_oversized_certificate_is_rejected() -> None:
    with pytest.raises(CertificateError, match=f"over the limit of {MAX_CERTIFICATE_SIZE}"):
        decode_certificate(String(ECDSA_CERTIFICATE_TYPE) + b"\x00" * MAX_CERTIFICATE_SIZE)


def test_option_value_falls_back_to_hex() -> None:
    ca_key = asyncssh.generate_private_key("ssh-ed25519")
    user = asyncssh.generate_private_key("ecdsa-sha2-nistp256")
    blob = build_certificate(ca_key, user, options=(("vendor-option@example.com", b"\xff\x01"),))

    assert decode_certificate(blob).critical_options[0].value == "ff01"


def test_login_with_certificate_is_recognised() -> None:
    ca_key = asyncssh.generate_private_key("ssh-ed25519")
    user = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    certificate_blob = ca_key.generate_user_certificate(user, "rsa-login").public_data
    # RFC 4252 section 7, with the certificate algorithm of PROTOCOL.certkeys.
    data = (
        String(b"\x42" * 32)
        + bytes([50])
        + String("alice")
        + String("ssh-connection")
        + String("publickey")
        + b"\x01"
        + String("rsa-sha2-512-cert-v01@openssh.com")
        + String(certificate_blob)
    )

    other_key = asyncssh.generate_private_key("ssh-rsa", key_size=2048).public_data

    by_certificate = describe_signed_data(data, certificate_blob)
    by_plain_key = describe_signed_data(data, user.public_data)
    by_other_key = describe_signed_data(data, other_key)

    assert by_certificate.purpose == PURPOSE_SSH_LOGIN
    assert by_certificate.user == "alice"
    assert by_certificate.algorithm == "rsa-sha2-512-cert-v01@openssh.com"
    assert by_certificate.certificate == certificate_blob
    # OpenSSH's ssh signs with the plain key while offering its certificate.
    assert by_plain_key.purpose == PURPOSE_SSH_LOGIN
    assert by_plain_key.certificate == certificate_blob
    assert by_other_key.purpose != PURPOSE_SSH_LOGIN
    assert by_other_key.certificate is None
