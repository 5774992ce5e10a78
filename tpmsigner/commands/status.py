"""tpmsigner status and audit: the TPM, its lockout state, the storage key, the identities, the audit log."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from ..audit import AuditLog, audit_command
from ..cliutil import add_audit_parser, print_json, print_table
from ..store import TpmBinding
from ..tpm import describe_parent
from .common import key_store, open_tpm, resolve_home
from .signer import AUDIT_FILE


def command_status(args: argparse.Namespace) -> int:
    store = key_store(args)
    identities = store.list()
    binding = TpmBinding(resolve_home(args.home))
    with open_tpm(args) as tpm:
        tpm.check_parents([int(handle, 16) for handle in binding.recorded()])
        recorded = binding.recorded()
        info = tpm.info()
        supported = [key_type.name for key_type in tpm.supported_key_types()]

    status = {
        "tpm": {
            "tcti": tpm.tcti,
            "manufacturer": info.manufacturer,
            "vendor": info.vendor,
            "firmware_version": info.firmware_version,
            "supported_key_types": supported,
        },
        "dictionary_attack": {**asdict(info.lockout), "tries_left": info.lockout.tries_left},
        "storage_keys": recorded,
        "identities": {
            "total": len(identities),
            "enabled": sum(1 for identity in identities if identity.enabled),
        },
        "last_request": AuditLog(resolve_home(args.home) / AUDIT_FILE).last(),
    }
    if args.json:
        print_json(status)
        return 0

    lockout = info.lockout
    rows = [
        ("TPM:", f"{info.manufacturer} {info.vendor}".strip() + f", firmware {info.firmware_version}"),
        ("TCTI:", tpm.tcti),
        ("key types:", ", ".join(supported)),
        (
            "lockout:",
            ("IN LOCKOUT, " if lockout.in_lockout else "")
            + f"{lockout.failed_tries} of {lockout.max_tries} failed tries, one forgotten every "
            f"{lockout.interval} s, recovery {lockout.recovery} s",
        ),
    ]
    for handle, name in sorted(recorded.items()):
        rows.append(("storage key:", f"{describe_parent(int(handle, 16))}, name {name}"))
    rows.append(("identities:", f"{status['identities']['total']} ({status['identities']['enabled']} enabled)"))
    last = status["last_request"]
    if isinstance(last, dict):
        rows.append(
            (
                "last request:",
                f"{last.get('time')} {last.get('outcome')}: {last.get('purpose', '?')} with "
                f"{last.get('key_label', last.get('key_fingerprint'))} from device {last.get('device')}",
            )
        )
    print_table(rows)
    return 0


def command_audit(args: argparse.Namespace) -> int:
    log = AuditLog(Path(args.file) if args.file else resolve_home(args.home) / AUDIT_FILE)
    return audit_command(log, args.action, args.since, args.json)


def add_parsers(commands) -> None:
    status = commands.add_parser("status", help="show the TPM, its lockout state and the identities")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=command_status)

    audit = add_audit_parser(commands, "audit.jsonl in the home directory")
    audit.set_defaults(handler=command_audit)
