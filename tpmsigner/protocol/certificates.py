"""OpenSSH user certificates, as OpenSSH's PROTOCOL.certkeys defines them.

A certificate binds a public key to a key id, principals and a validity
interval, signed by a certificate authority (CA) key.  Its blob is

    string    "ecdsa-sha2-nistp256-cert-v01@openssh.com" (or another type)
    string    nonce
    ...       the certified key's fields, as in the plain key blob
    uint64    serial
    uint32    type                  1 for a user, 2 for a host certificate
    string    key id
    string    valid principals      strings packed in a string
    uint64    valid after           seconds since the epoch
    uint64    valid before
    string    critical options      (string name, string data) pairs
    string    extensions            (string name, string data) pairs
    string    reserved
    string    signature key         the CA's public key blob
    string    signature             over every field above it

A signature made with a certified key is the plain key's signature: the
certificate only changes what the client sends as its public key.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime, timezone

import asyncssh
from asyncssh.packet import PacketDecodeError, SSHPacket, String
from asyncssh.public_key import decode_ssh_public_key

from ..errors import CertificateError
from .sshkeys import CERTIFICATE_KEY_TYPES, fingerprint_of_blob

SSH_CERT_TYPE_USER = 1
SSH_CERT_TYPE_HOST = 2
CERTIFICATE_TYPE_SUFFIX = "-cert-v01@openssh.com"

# "valid after" 0 and "valid before" 2**64 - 1 mean no bound; ssh-keygen
# writes them for "-V always" and "-V forever".
VALID_ALWAYS = 0
VALID_FOREVER = 2**64 - 1

# Large enough for a 16 KiB RSA CA key and many principals.  OpenSSH 9.2
# sets no size of its own, but every listing carries each certificate blob,
# and the signer protocol and the agent protocol limit message sizes.
MAX_CERTIFICATE_SIZE = 16 * 1024
# OpenSSH's SSHKEY_CERT_MAX_PRINCIPALS.
MAX_PRINCIPALS = 256

VALID = "valid"
EXPIRED = "expired"
NOT_YET_VALID = "not yet valid"

# CA signature algorithms that sshd accepts without CASignatureAlgorithms
# set: OpenSSH 8.2 dropped ssh-rsa (RSA with SHA-1) from its default.
DEFAULT_CA_SIGNATURE_ALGORITHMS = frozenset(
    {
        "ssh-ed25519",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
        "rsa-sha2-256",
        "rsa-sha2-512",
    }
)


@dataclass(frozen=True)
class CertificateOption:
    """One critical option or extension: a name and its data."""

    name: str
    data: bytes

    @property
    def value(self) -> str:
        """The option's value as text: "" for a flag, else its one string, else hex.

        The options OpenSSH defines (force-command, source-address) carry
        their value as one string inside ``data``.
        """
        if not self.data:
            return ""
        try:
            packet = SSHPacket(self.data)
            text = packet.get_string().decode("utf-8")
            packet.check_end()
        except (PacketDecodeError, UnicodeDecodeError):
            return self.data.hex()
        return text


@dataclass(frozen=True)
class Certificate:
    """A parsed OpenSSH certificate whose CA signature was verified."""

    blob: bytes
    certificate_type: str        # "ecdsa-sha2-nistp256-cert-v01@openssh.com", ...
    key_blob: bytes              # the certified key, as a plain key blob
    serial: int
    kind: int                    # SSH_CERT_TYPE_USER or SSH_CERT_TYPE_HOST
    key_id: str
    principals: tuple[str, ...]  # empty means any principal
    valid_after: int             # seconds since the epoch, UTC
    valid_before: int
    critical_options: tuple[CertificateOption, ...]
    extensions: tuple[CertificateOption, ...]
    ca_key_blob: bytes
    signature_algorithm: str     # of the CA's signature, e.g. "ssh-ed25519"

    @property
    def is_user_certificate(self) -> bool:
        return self.kind == SSH_CERT_TYPE_USER

    @property
    def kind_name(self) -> str:
        return {SSH_CERT_TYPE_USER: "user", SSH_CERT_TYPE_HOST: "host"}.get(self.kind, f"unknown type {self.kind}")

    @property
    def ca_fingerprint(self) -> str:
        return fingerprint_of_blob(self.ca_key_blob)

    @property
    def ca_key_type(self) -> str:
        return SSHPacket(self.ca_key_blob).get_string().decode("ascii", errors="replace")

    def validity(self, now: float) -> str:
        """Return VALID, EXPIRED or NOT_YET_VALID at ``now`` (seconds since the epoch).

        The same comparisons as sshd's: valid from "valid after" inclusive
        up to "valid before" exclusive.
        """
        if now < self.valid_after:
            return NOT_YET_VALID
        if now >= self.valid_before:
            return EXPIRED
        return VALID

    def openssh_line(self, comment: str) -> str:
        """Format the certificate as one line of a ``-cert.pub`` file."""
        encoded = base64.b64encode(self.blob).decode("ascii")
        return f"{self.certificate_type} {encoded} {comment}".rstrip()

    def to_display(self, now: float, comment: str) -> dict[str, object]:
        """Return the fields ``show --json`` prints; unbounded validity times are null."""
        status = self.validity(now)
        return {
            "type": self.certificate_type,
            "kind": self.kind_name,
            "certificate": self.openssh_line(comment),
            "key_id": self.key_id,
            "serial": self.serial,
            "principals": list(self.principals),
            "valid_after": format_validity_time(self.valid_after, VALID_ALWAYS),
            "valid_before": format_validity_time(self.valid_before, VALID_FOREVER),
            "status": status,
            "expired": status == EXPIRED,
            "not_yet_valid": status == NOT_YET_VALID,
            "ca_key_type": self.ca_key_type,
            "ca_fingerprint": self.ca_fingerprint,
            "signature_algorithm": self.signature_algorithm,
            "critical_options": {option.name: option.value for option in self.critical_options},
            "extensions": {extension.name: extension.value for extension in self.extensions},
        }


def format_validity_time(seconds: int, unbounded: int) -> str | None:
    """Return ``seconds`` as ISO 8601 UTC, or None for the value that means no bound.

    NOTE: Python's datetime stops at the year 9999, so later times are shown
    as the last second of 9999.
    """
    if seconds == unbounded:
        return None
    latest = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)
    if seconds >= latest.timestamp():
        return latest.isoformat()
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


def is_certificate_blob(blob: bytes) -> bool:
    """Return True if ``blob`` starts with the name of an OpenSSH certificate type."""
    try:
        name = SSHPacket(blob).get_string()
    except PacketDecodeError:
        return False
    return name.endswith(CERTIFICATE_TYPE_SUFFIX.encode("ascii"))


def decode_certificate(blob: bytes) -> Certificate:
    """Parse a certificate blob and verify its CA signature; raise CertificateError otherwise.

    Only the certificate types of the key types that tpmsigner supports are
    accepted (ECDSA P-256 and P-384, RSA).
    """
    if len(blob) > MAX_CERTIFICATE_SIZE:
        raise CertificateError(f"the certificate is {len(blob)} bytes, over the limit of {MAX_CERTIFICATE_SIZE}")
    try:
        packet = SSHPacket(blob)
        certificate_type = packet.get_string().decode("ascii")
        certified = CERTIFICATE_KEY_TYPES.get(certificate_type)
        if certified is None:
            raise CertificateError(_unsupported_type_message(certificate_type))
        packet.get_string()                 # nonce
        key_fields = [packet.get_string() for _ in range(certified.field_count)]
        serial = packet.get_uint64()
        kind = packet.get_uint32()
        key_id = packet.get_string().decode("utf-8")
        principals = _decode_principals(packet.get_string())
        valid_after = packet.get_uint64()
        valid_before = packet.get_uint64()
        critical_options = _decode_options(packet.get_string(), "critical option")
        extensions = _decode_options(packet.get_string(), "extension")
        packet.get_string()                 # reserved
        ca_key_blob = packet.get_string()
        signed = packet.get_consumed_payload()
        signature = packet.get_string()
        packet.check_end()
    except (PacketDecodeError, UnicodeDecodeError) as exc:
        raise CertificateError(f"malformed OpenSSH certificate: {exc}") from None

    signature_algorithm = _verify_ca_signature(ca_key_blob, signed, signature)
    return Certificate(
        blob=blob,
        certificate_type=certificate_type,
        key_blob=String(certified.key_type) + b"".join(String(field) for field in key_fields),
        serial=serial,
        kind=kind,
        key_id=key_id,
        principals=principals,
        valid_after=valid_after,
        valid_before=valid_before,
        critical_options=critical_options,
        extensions=extensions,
        ca_key_blob=ca_key_blob,
        signature_algorithm=signature_algorithm,
    )


def parse_certificate_line(text: str, source: str) -> Certificate:
    """Parse the first line of a ``-cert.pub`` file: type, base64 blob, optional comment."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise CertificateError(f"{source} is empty; expected an OpenSSH certificate line such as ssh-keygen -s writes")
    fields = lines[0].split()
    if len(fields) < 2:
        raise CertificateError(f"{source}: expected 'TYPE BASE64 [COMMENT]' on the first line")
    declared_type, encoded = fields[0], fields[1]
    if not declared_type.endswith(CERTIFICATE_TYPE_SUFFIX):
        raise CertificateError(
            f"{source} contains a {declared_type} public key, not a certificate; "
            "give the -cert.pub file that ssh-keygen -s wrote"
        )
    try:
        blob = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise CertificateError(f"{source}: the certificate is not valid base64") from None

    certificate = decode_certificate(blob)
    if certificate.certificate_type != declared_type:
        raise CertificateError(
            f"{source}: the line names type {declared_type}, but the certificate in it is of type "
            f"{certificate.certificate_type}"
        )
    return certificate


def _unsupported_type_message(name: str) -> str:
    supported = ", ".join(CERTIFICATE_KEY_TYPES)
    if name.endswith(CERTIFICATE_TYPE_SUFFIX):
        return f"unsupported certificate type {name}: tpmsigner keys take {supported}"
    return f"{name} is not an OpenSSH certificate type; expected one of {supported}"


def _decode_principals(data: bytes) -> tuple[str, ...]:
    packet = SSHPacket(data)
    principals = []
    while packet:
        if len(principals) == MAX_PRINCIPALS:
            raise CertificateError(f"the certificate lists more than {MAX_PRINCIPALS} principals")
        principals.append(packet.get_string().decode("utf-8"))
    return tuple(principals)


def _decode_options(data: bytes, what: str) -> tuple[CertificateOption, ...]:
    """Parse (name, data) pairs; each name may appear once (PROTOCOL.certkeys)."""
    packet = SSHPacket(data)
    options: list[CertificateOption] = []
    seen: set[str] = set()
    while packet:
        name = packet.get_string().decode("utf-8")
        if name in seen:
            raise CertificateError(f"the certificate has the {what} {name!r} twice")
        seen.add(name)
        options.append(CertificateOption(name, packet.get_string()))
    return tuple(options)


def _verify_ca_signature(ca_key_blob: bytes, signed: bytes, signature: bytes) -> str:
    """Check the CA's signature over the certificate; return its algorithm name."""
    try:
        signature_algorithm = SSHPacket(signature).get_string().decode("ascii")
    except (PacketDecodeError, UnicodeDecodeError):
        raise CertificateError("the certificate's signature is malformed") from None
    if is_certificate_blob(ca_key_blob):
        # PROTOCOL.certkeys: "It is an error for a signature key to be a certificate."
        raise CertificateError("the certificate is signed by another certificate, not by a CA key")
    try:
        ca_key = decode_ssh_public_key(ca_key_blob)
        verified = bool(ca_key.verify(signed, signature))
    except (asyncssh.KeyImportError, PacketDecodeError, ValueError) as exc:
        raise CertificateError(f"the certificate's CA key cannot be used: {exc}") from None
    if not verified:
        raise CertificateError(
            f"the certificate's CA signature ({signature_algorithm}) does not verify with its CA key "
            f"{fingerprint_of_blob(ca_key_blob)}; the file is damaged or was altered"
        )
    return signature_algorithm
