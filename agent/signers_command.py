"""tpmsigner-agent signers: list the signers this agent has pinned."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tpmsigner.cliutil import print_json, print_table
from tpmsigner.protocol.channel import format_public_key, public_key_fingerprint

from .config import AgentHome, PinnedSigner, default_home


def signer_record(signer: PinnedSigner) -> dict[str, object]:
    """Return the fields that ``signers --json`` prints for one signer."""
    return {
        "name": signer.name,
        "address": signer.address,
        "mdns": signer.uses_mdns,
        "key": format_public_key(signer.public_key),
        "fingerprint": public_key_fingerprint(signer.public_key),
    }


def command_signers(args: argparse.Namespace) -> int:
    signers = AgentHome(Path(args.home) if args.home else default_home()).signers()
    if args.json:
        print_json([signer_record(signer) for signer in signers])
        return 0
    if not signers:
        print("no signers pinned; pin one with 'tpmsigner-agent pair' or 'tpmsigner-agent trust'", file=sys.stderr)
        return 0
    rows = [("NAME", "ADDRESS", "KEY FINGERPRINT")]
    rows += [(signer.name, signer.address, public_key_fingerprint(signer.public_key)) for signer in signers]
    print_table(rows)
    return 0


def add_parsers(commands) -> None:
    signers = commands.add_parser("signers", help="list the pinned signers")
    signers.add_argument("--json", action="store_true", help="print JSON instead of a table")
    signers.set_defaults(handler=command_signers)
