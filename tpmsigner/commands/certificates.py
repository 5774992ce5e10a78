"""cert add and cert remove: an OpenSSH user certificate for an identity's key."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import CertificateError, ConfigError
from ..protocol.certificates import (
    DEFAULT_CA_SIGNATURE_ALGORITHMS,
    EXPIRED,
    MAX_CERTIFICATE_SIZE,
    NOT_YET_VALID,
    VALID_ALWAYS,
    VALID_FOREVER,
    Certificate,
    format_validity_time,
    parse_certificate_line,
)
from ..protocol.sshkeys import fingerprint_of_blob
from ..store import Identity
from .common import key_store

# A -cert.pub line is the base64 of the blob plus a type name and a comment.
MAX_CERTIFICATE_FILE_SIZE = 2 * MAX_CERTIFICATE_SIZE


def read_certificate_file(path: Path) -> Certificate:
    """Read and verify the certificate in a ``-cert.pub`` file."""
    try:
        with open(path, "rb") as certificate_file:
            data = certificate_file.read(MAX_CERTIFICATE_FILE_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read certificate file {path}: {exc.strerror}") from None
    if len(data) > MAX_CERTIFICATE_FILE_SIZE:
        raise CertificateError(f"{path} is over {MAX_CERTIFICATE_FILE_SIZE} bytes; a certificate file is one short line")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise CertificateError(f"{path} is not an OpenSSH certificate file: it is not ASCII text") from None
    try:
        return parse_certificate_line(text, str(path))
    except CertificateError as exc:
        message = str(exc)
        if not message.startswith(str(path)):
            message = f"{path}: {message}"
        raise CertificateError(message) from None


def check_certificate_fits(certificate: Certificate, identity: Identity, source: str) -> None:
    """Raise CertificateError unless ``certificate`` is a user certificate of the identity's key."""
    if certificate.key_blob != identity.public_key_blob:
        raise CertificateError(
            f"the certificate in {source} is for the key {fingerprint_of_blob(certificate.key_blob)}, not for "
            f"identity {identity.label!r} ({identity.fingerprint}); have the CA sign the public key that "
            f"'tpmsigner show {identity.label}' prints"
        )
    if not certificate.is_user_certificate:
        raise CertificateError(
            f"the certificate in {source} is a {certificate.kind_name} certificate; an identity needs a user "
            "certificate (ssh-keygen -s without -h)"
        )


def describe_certificate(certificate: Certificate) -> str:
    """Return a one-line summary: key id, serial and validity."""
    return (
        f"key id {certificate.key_id!r}, serial {certificate.serial}, "
        f"{describe_validity(certificate)}"
    )


def describe_validity(certificate: Certificate) -> str:
    after = format_validity_time(certificate.valid_after, VALID_ALWAYS)
    before = format_validity_time(certificate.valid_before, VALID_FOREVER)
    if after is None and before is None:
        return "valid forever"
    if after is None:
        return f"valid until {before}"
    if before is None:
        return f"valid from {after} on"
    return f"valid from {after} to {before}"


def warn(message: str) -> None:
    print(f"tpmsigner: warning: {message}", file=sys.stderr)


def command_cert_add(args: argparse.Namespace) -> int:
    store = key_store(args)
    identity = store.get(args.label)
    path = Path(args.file)
    certificate = read_certificate_file(path)
    check_certificate_fits(certificate, identity, str(path))

    previous = identity.certificate
    if previous is not None and previous.blob == certificate.blob:
        print(f"identity {identity.label!r} already has this certificate; nothing changed", file=sys.stderr)
        return 0
    store.set_certificate(identity.label, certificate)

    if previous is None:
        print(f"added the certificate to identity {identity.label!r}: {describe_certificate(certificate)}", file=sys.stderr)
    else:
        print(
            f"replaced the certificate of identity {identity.label!r} ({describe_certificate(previous)}) "
            f"with: {describe_certificate(certificate)}",
            file=sys.stderr,
        )

    # ssh-agent accepts such certificates too; servers are the ones that
    # reject them, so these are warnings, not errors.
    status = certificate.validity(time.time())
    if status == EXPIRED:
        warn("this certificate has expired; agents list it, but servers reject logins with it")
    elif status == NOT_YET_VALID:
        warn("this certificate is not valid yet; servers reject logins with it until then")
    if certificate.signature_algorithm not in DEFAULT_CA_SIGNATURE_ALGORITHMS:
        warn(
            f"the CA signed this certificate with {certificate.signature_algorithm}, which sshd rejects "
            "by default since OpenSSH 8.2 (CASignatureAlgorithms); re-sign it with rsa-sha2-512 "
            "(ssh-keygen -s CA -t rsa-sha2-512)"
        )
    return 0


def command_cert_remove(args: argparse.Namespace) -> int:
    store = key_store(args)
    identity = store.get(args.label)
    if identity.certificate is None:
        raise ConfigError(f"identity {identity.label!r} has no certificate")
    store.set_certificate(identity.label, None)
    print(
        f"removed the certificate ({describe_certificate(identity.certificate)}) of identity "
        f"{identity.label!r}; agents list only its key now",
        file=sys.stderr,
    )
    return 0


def certificate_rows(identity: Identity, now: float) -> list[tuple[str, str]]:
    """Return the rows that ``show`` prints for the identity's certificate, if it has one."""
    certificate = identity.certificate
    if certificate is None:
        return []
    status = certificate.validity(now)
    rows = [
        ("certificate:", f"{certificate.certificate_type} ({certificate.kind_name} certificate)"),
        ("  key id:", certificate.key_id),
        ("  serial:", str(certificate.serial)),
        ("  principals:", ", ".join(certificate.principals) if certificate.principals else "any (none listed)"),
        ("  validity:", describe_validity(certificate)),
        ("  status:", status.upper() if status in (EXPIRED, NOT_YET_VALID) else status),
        ("  CA key:", f"{certificate.ca_key_type} {certificate.ca_fingerprint}"),
        ("  CA signature:", certificate.signature_algorithm),
    ]
    for option in certificate.critical_options:
        rows.append(("  critical option:", f"{option.name} {option.value}".rstrip()))
    if certificate.extensions:
        rows.append(("  extensions:", ", ".join(f"{ext.name} {ext.value}".rstrip() for ext in certificate.extensions)))
    return rows


def certificate_state(identity: Identity, now: float) -> str:
    """Return the ``list`` column: "", "certificate", or "certificate expired" and the like."""
    certificate = identity.certificate
    if certificate is None:
        return ""
    status = certificate.validity(now)
    return "certificate" if status not in (EXPIRED, NOT_YET_VALID) else f"certificate {status}"


def add_parsers(commands) -> None:
    """Add the ``cert`` subcommand to ``commands`` (an argparse subparsers object)."""
    cert = commands.add_parser("cert", help="add or remove an identity's OpenSSH user certificate")
    actions = cert.add_subparsers(dest="cert_command", required=True, metavar="ACTION")

    add = actions.add_parser(
        "add",
        help="store a user certificate of the identity's key; agents then list the key and the certificate",
    )
    add.add_argument("label", help="the identity's label, as 'tpmsigner list' shows it")
    add.add_argument("file", help="the certificate, e.g. work-cert.pub written by ssh-keygen -s")
    add.set_defaults(handler=command_cert_add)

    remove = actions.add_parser("remove", help="remove an identity's certificate")
    remove.add_argument("label", help="the identity's label, as 'tpmsigner list' shows it")
    remove.set_defaults(handler=command_cert_remove)
