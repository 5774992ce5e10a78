"""tpmsigner-agent signers: list the signers this agent has pinned, and check that they can be reached."""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path

from tpmsigner.cliutil import print_json, print_table
from tpmsigner.errors import SignerError
from tpmsigner.protocol.channel import StaticKey, format_public_key, public_key_fingerprint

from .config import AgentHome, PinnedSigner, default_home


@dataclass(frozen=True)
class SignerCheck:
    """The result of one connection to a signer: how many identities it listed, or why it failed."""

    reachable: bool
    identities: int | None = None
    error: str | None = None


def signer_record(signer: PinnedSigner, check: SignerCheck | None = None) -> dict[str, object]:
    """Return the fields that ``signers --json`` prints for one signer; the check's fields are null without one."""
    return {
        "name": signer.name,
        "address": signer.address,
        "mdns": signer.uses_mdns,
        "key": format_public_key(signer.public_key),
        "fingerprint": public_key_fingerprint(signer.public_key),
        "reachable": check.reachable if check else None,
        "identities": check.identities if check else None,
        "error": check.error if check else None,
    }


async def check_signer(signer: PinnedSigner, static_key: StaticKey, interfaces: list[str] | None) -> SignerCheck:
    """Connect to ``signer`` as the agent does, with its handshake and pinned key, and ask for its identities.

    A listing needs no approval, so the check shows no prompt on the
    signer host.  Every step has the agent's own timeouts.
    """
    from .signer_client import SignerClient

    client = SignerClient(signer, static_key, interfaces)
    try:
        identities = await client.list_identities()
    except SignerError as exc:
        return SignerCheck(reachable=False, error=str(exc))
    finally:
        await client.close()
    return SignerCheck(reachable=True, identities=len(identities))


async def _check_all(
    signers: list[PinnedSigner], static_key: StaticKey, interfaces: list[str] | None
) -> list[SignerCheck]:
    return list(await asyncio.gather(*(check_signer(signer, static_key, interfaces) for signer in signers)))


def command_signers(args: argparse.Namespace) -> int:
    home = AgentHome(Path(args.home) if args.home else default_home())
    signers = home.signers()
    checks: list[SignerCheck | None] = [None] * len(signers)
    if args.check and signers:
        checks = list(asyncio.run(_check_all(signers, home.static_key(), args.interface or None)))
    failed = sum(1 for check in checks if check is not None and not check.reachable)

    if args.json:
        print_json([signer_record(signer, check) for signer, check in zip(signers, checks)])
        return 1 if failed else 0
    if not signers:
        print("no signers pinned; pin one with 'tpmsigner-agent pair' or 'tpmsigner-agent trust'", file=sys.stderr)
        return 0

    header = ("NAME", "ADDRESS", "KEY FINGERPRINT")
    if not args.check:
        rows = [header] + [(signer.name, signer.address, public_key_fingerprint(signer.public_key)) for signer in signers]
        print_table(rows)
        return 0

    rows = [(*header, "STATUS")]
    for signer, check in zip(signers, checks):
        assert check is not None
        status = f"ok, {check.identities} identities" if check.reachable else "unreachable"
        rows.append((signer.name, signer.address, public_key_fingerprint(signer.public_key), status))
    print_table(rows)
    for signer, check in zip(signers, checks):
        if check is not None and check.error:
            print(f"{signer.name}: {check.error}", file=sys.stderr)
    return 1 if failed else 0


def add_parsers(commands) -> None:
    signers = commands.add_parser("signers", help="list the pinned signers, and with --check whether they can be reached")
    signers.add_argument("--json", action="store_true", help="print JSON instead of a table")
    signers.add_argument(
        "--check",
        action="store_true",
        help="connect to each signer as the agent does and ask for its identities (no approval is asked); "
        "exit 1 if any cannot be reached",
    )
    signers.add_argument(
        "--interface",
        action="append",
        default=[],
        metavar="ADDR",
        help="with --check, look for signers pinned as 'mdns' only on the interface with this IP address, or "
        "with this name; may be repeated (default: every interface)",
    )
    signers.set_defaults(handler=command_signers)
