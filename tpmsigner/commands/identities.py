"""keygen, list, show, enable, disable, delete, rotate, change-pin, restrict and import."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


from ..errors import ConfigError, IdentityExistsError, KeyFileError, TpmSignerError
from ..identities import create_identity
from ..keyfile import read_key_file
from ..keytypes import key_type_by_name
from ..protocol.sshkeys import fingerprint_of_blob
from ..store import validate_label
from ..tpm import key_type_of
from .certificates import certificate_rows, certificate_state
from ..cliutil import print_json, print_table
from .common import confirm, key_store, open_tpm, read_new_pin, read_pin


def command_keygen(args: argparse.Namespace) -> int:
    label = validate_label(args.label)
    key_type = key_type_by_name(args.type)
    store = key_store(args)
    store.ensure_label_free(label)
    pin = read_new_pin(args.pin_file)
    with open_tpm(args) as tpm:
        print(f"creating an {key_type.description} key in the TPM at {tpm.tcti} ...", file=sys.stderr)
        identity = create_identity(tpm, store, label, pin, key_type)
    print(f"created identity {label!r}, {identity.fingerprint}", file=sys.stderr)
    print(identity.openssh_line())
    return 0


def command_list(args: argparse.Namespace) -> int:
    identities = key_store(args).list()
    if args.json:
        print_json([identity.to_display() for identity in identities])
        return 0
    if not identities:
        print("no identities; create one with 'tpmsigner keygen LABEL'", file=sys.stderr)
        return 0
    now = time.time()
    print_table(
        [
            (
                identity.label,
                identity.key_type,
                identity.fingerprint,
                "enabled" if identity.enabled else "disabled",
                certificate_state(identity, now),
            )
            for identity in identities
        ]
    )
    return 0


def command_show(args: argparse.Namespace) -> int:
    identity = key_store(args).get(args.label)
    if args.json:
        print_json(identity.to_display())
        return 0
    print(identity.openssh_line())
    print_table(
        [
            ("label:", identity.label),
            ("type:", identity.key_type),
            ("fingerprint:", identity.fingerprint),
            ("created:", identity.created),
            ("enabled:", "yes" if identity.enabled else "no"),
            ("last used:", identity.last_used or "never"),
            *([("description:", identity.description)] if identity.description else []),
            *[("only for host:", fingerprint) for fingerprint in identity.allowed_host_keys],
            *certificate_rows(identity, time.time()),
        ]
    )
    return 0


def command_enable(args: argparse.Namespace) -> int:
    key_store(args).set_enabled(args.label, True)
    print(f"identity {args.label!r} is enabled", file=sys.stderr)
    return 0


def command_disable(args: argparse.Namespace) -> int:
    key_store(args).set_enabled(args.label, False)
    print(f"identity {args.label!r} is disabled: agents no longer list it and the signer rejects it", file=sys.stderr)
    return 0


def command_delete(args: argparse.Namespace) -> int:
    store = key_store(args)
    identity = store.get(args.label)
    if not args.yes and not confirm(
        f"Delete identity {identity.label!r} ({identity.fingerprint})? The key cannot be recovered",
        f"deleting identity {identity.label!r}, whose key cannot be recovered,",
    ):
        print("nothing was deleted", file=sys.stderr)
        return 1
    store.delete(identity.label)
    print(f"deleted identity {identity.label!r}", file=sys.stderr)
    return 0


def command_rotate(args: argparse.Namespace) -> int:
    """Create a new key under LABEL; keep the old one disabled as LABEL.old-DATE."""
    store = key_store(args)
    old = store.get(args.label)
    old_blob = store.key_blob(old)
    key_type = key_type_of(old_blob)
    if key_type is None:
        raise ConfigError(f"identity {old.label!r} has a key type that keygen cannot create; create a new identity")
    archive_label = _free_archive_label(store, old.label)
    pin = read_new_pin(args.pin_file, what=f"the new key of {old.label}")

    with open_tpm(args) as tpm:
        print(f"creating a new {key_type.description} key for {old.label!r} ...", file=sys.stderr)
        new_blob = tpm.create_key(pin, key_type)
    store.rename(old.label, archive_label, enabled=False)
    try:
        identity = store.add(old.label, new_blob)
    except (OSError, TpmSignerError) as exc:
        # The new key was never shown to anyone, so losing it costs nothing;
        # the old one goes back under its label, as it was before.
        try:
            store.rename(archive_label, old.label, enabled=old.enabled)
        except (OSError, TpmSignerError) as restore_exc:
            raise ConfigError(
                f"rotating {old.label!r} failed: {exc}; moving the old key back failed too: {restore_exc}. "
                f"The old key is kept, disabled, as {archive_label!r}: enable it with "
                f"'tpmsigner enable {archive_label}' to go on using it"
            ) from None
        raise ConfigError(f"rotating {old.label!r} failed: {exc}; the old key is unchanged under {old.label!r}") from None
    print(f"the old key is kept, disabled, as {archive_label!r}; delete it when no server needs it", file=sys.stderr)
    print(identity.openssh_line())
    return 0


def _free_archive_label(store, label: str) -> str:
    base = f"{label}.old-{datetime.now(timezone.utc):%Y%m%d}"
    candidate = base
    for number in range(2, 100):
        try:
            store.ensure_label_free(validate_label(candidate))
            return candidate
        except IdentityExistsError:
            candidate = f"{base}-{number}"
    raise ConfigError(f"too many archived keys named {base}*; delete some of them first")


def command_change_pin(args: argparse.Namespace) -> int:
    store = key_store(args)
    identity = store.get(args.label)
    blob = store.key_blob(identity)
    old_pin = read_pin(args.pin_file, f"current PIN for {identity.label}: ")
    new_pin = read_new_pin(args.new_pin_file, what=identity.label)
    with open_tpm(args) as tpm:
        new_blob = tpm.change_pin(blob, old_pin, new_pin)
    store.replace_key(identity, new_blob)
    print(f"changed the PIN of {identity.label!r}; the old PIN no longer works with the stored key", file=sys.stderr)
    return 0


def command_import(args: argparse.Namespace) -> int:
    label = validate_label(args.label)
    store = key_store(args)
    store.ensure_label_free(label)
    path = Path(args.file)
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from None
    key_file = read_key_file(pem, source=str(path))

    with open_tpm(args) as tpm:
        tpm.check_loads(key_file.blob)
    identity = store.add(label, key_file.blob, description=key_file.description)
    print(f"imported {path} as identity {label!r}, {identity.fingerprint}", file=sys.stderr)
    print(identity.openssh_line())
    return 0


def command_restrict(args: argparse.Namespace) -> int:
    # Imported here: importing asyncssh takes longer than most commands run.
    import asyncssh

    fingerprints = []
    for path in args.host_key:
        try:
            line = Path(path).read_text().strip().splitlines()[0]
        except (OSError, IndexError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read a host public key from {path}: {exc}") from None
        if line.startswith("-----BEGIN"):
            # The host key's .pub file is the one to give, never its private key.
            raise ConfigError(
                f"{path} is a private key or a PEM file, not an OpenSSH public key line; give the host's "
                ".pub file, e.g. /etc/ssh/ssh_host_ecdsa_key.pub, or a line from 'ssh-keyscan HOST'"
            )
        try:
            key = asyncssh.import_public_key(line)
        except (ValueError, asyncssh.KeyImportError) as exc:
            raise ConfigError(
                f"cannot read a host public key from {path}: {exc}; give an OpenSSH public key line "
                "such as the host's .pub file"
            ) from None
        fingerprints.append(fingerprint_of_blob(key.public_data))
    identity = key_store(args).set_allowed_host_keys(args.label, tuple(dict.fromkeys(fingerprints)))
    print(
        f"identity {identity.label!r} now signs only logins to: {', '.join(identity.allowed_host_keys)}",
        file=sys.stderr,
    )
    return 0


def command_unrestrict(args: argparse.Namespace) -> int:
    key_store(args).set_allowed_host_keys(args.label, ())
    print(f"identity {args.label!r} is no longer restricted to particular hosts", file=sys.stderr)
    return 0


def add_parsers(commands) -> None:
    """Add the identity subcommands to ``commands`` (an argparse subparsers object)."""
    keygen = commands.add_parser("keygen", help="create a key in the TPM and print its OpenSSH public key")
    keygen.add_argument("label", help="name of the new identity, also the key comment")
    keygen.add_argument(
        "--type",
        default="ecdsa-p256",
        choices=["ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072"],
        help="key type (default: ecdsa-p256)",
    )
    keygen.add_argument("--pin-file", help="read the PIN from the first line of this file instead of the terminal")
    keygen.set_defaults(handler=command_keygen)

    list_parser = commands.add_parser("list", help="list identities (does not use the TPM)")
    list_parser.add_argument("--json", action="store_true", help="print JSON")
    list_parser.set_defaults(handler=command_list)

    show = commands.add_parser("show", help="show one identity (does not use the TPM)")
    show.add_argument("label", help="the identity's label, as 'tpmsigner list' shows it")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=command_show)

    enable = commands.add_parser("enable", help="let agents list and use an identity again")
    enable.add_argument("label", help="the identity's label, as 'tpmsigner list' shows it")
    enable.set_defaults(handler=command_enable)

    disable = commands.add_parser("disable", help="hide an identity from agents and reject its use")
    disable.add_argument("label", help="the identity's label, as 'tpmsigner list' shows it")
    disable.set_defaults(handler=command_disable)

    delete = commands.add_parser("delete", help="delete an identity and its key file")
    delete.add_argument("label", help="the identity's label, as 'tpmsigner list' shows it")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    delete.set_defaults(handler=command_delete)

    rotate = commands.add_parser("rotate", help="replace an identity's key, keeping the old one disabled")
    rotate.add_argument("label", help="the identity's label, as 'tpmsigner list' shows it")
    rotate.add_argument("--pin-file", help="read the new key's PIN from the first line of this file")
    rotate.set_defaults(handler=command_rotate)

    change_pin = commands.add_parser("change-pin", help="change an identity's PIN (TPM2_ObjectChangeAuth)")
    change_pin.add_argument("label", help="the identity's label, as 'tpmsigner list' shows it")
    change_pin.add_argument("--pin-file", help="read the current PIN from the first line of this file")
    change_pin.add_argument("--new-pin-file", help="read the new PIN from the first line of this file")
    change_pin.set_defaults(handler=command_change_pin)

    restrict = commands.add_parser("restrict", help="let an identity sign only logins to given host keys")
    restrict.add_argument("label", help="the identity's label, as 'tpmsigner list' shows it")
    restrict.add_argument(
        "--host-key",
        action="append",
        required=True,
        metavar="FILE",
        help="a server's public host key file, e.g. ssh_host_ed25519_key.pub (repeatable)",
    )
    restrict.set_defaults(handler=command_restrict)

    unrestrict = commands.add_parser("unrestrict", help="lift an identity's host key restriction")
    unrestrict.add_argument("label", help="the identity's label, as 'tpmsigner list' shows it")
    unrestrict.set_defaults(handler=command_unrestrict)

    import_parser = commands.add_parser("import", help="adopt a TSS2 PRIVATE KEY file made for this TPM")
    import_parser.add_argument("file", help="the key file, e.g. an ssh-tpm-agent .tpm file")
    import_parser.add_argument("label", help="name of the new identity")
    import_parser.set_defaults(handler=command_import)
