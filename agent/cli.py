"""The ``tpmsigner-agent`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
from pathlib import Path

from tpmsigner import __version__
from tpmsigner.cliutil import add_audit_parser, add_verbosity_options, run_handler
from tpmsigner.config_file import parse_args_with_config
from tpmsigner.errors import ConfigError
from tpmsigner.printable import escape_nonprintable
from tpmsigner.protocol.channel import format_public_key, public_key_fingerprint

from tpmsigner.audit import AuditLog, audit_command

from . import shell
from .audit import default_audit_path
from . import signers_command
from .config import DEFAULT_BROWSE_TIMEOUT, AgentHome, default_home

logger = logging.getLogger("tpmsigner_agent")


def _home(args: argparse.Namespace) -> AgentHome:
    return AgentHome(Path(args.home) if args.home else default_home())


def command_id(args: argparse.Namespace) -> int:
    print(format_public_key(_home(args).static_key().public))
    return 0


def command_trust(args: argparse.Namespace) -> int:
    signer = _home(args).trust(args.name, args.address, args.key, replace=args.replace)
    print(
        f"trusting signer {signer.name!r} at {signer.address} with key {public_key_fingerprint(signer.public_key)}",
        file=sys.stderr,
    )
    return 0


def command_pair(args: argparse.Namespace) -> int:
    from tpmsigner.pairing import default_name, require_terminal

    from .pairing import pair_with_signer

    require_terminal()
    _check_browse_timeout(args.timeout)
    signer = asyncio.run(
        pair_with_signer(
            _home(args),
            args.address,
            device_name=args.device_name or default_name(),
            signer_name=args.name,
            signer_address=args.signer_address,
            browse_timeout=args.timeout,
            interfaces=args.interface or None,
        )
    )
    print(f"Pinned signer {signer.name!r} at {signer.address} with key {public_key_fingerprint(signer.public_key)}.")
    return 0


def command_discover(args: argparse.Namespace) -> int:
    from tpmsigner.cliutil import print_json
    from tpmsigner.discovery import SIGNER_SERVICE

    from .discovery import browse, format_host_port

    _check_browse_timeout(args.timeout)
    pinned = {public_key_fingerprint(signer.public_key): signer.name for signer in _home(args).signers()}
    services = asyncio.run(browse(SIGNER_SERVICE, args.timeout, args.interface or None))
    rows = [
        {
            "name": service.instance,
            "addresses": list(service.addresses),
            "port": service.port,
            "fingerprint": service.fingerprint,
            "version": service.version,
            "paired": service.fingerprint in pinned,
            "pinned_as": pinned.get(service.fingerprint or ""),
        }
        for service in services
    ]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print(f"no signer found over mDNS within {args.timeout:g} s", file=sys.stderr)
        return 0
    for row in rows:
        where = " ".join(format_host_port(address, row["port"]) for address in row["addresses"]) or "no address"
        paired = f"paired as {row['pinned_as']!r}" if row["paired"] else "not paired"
        # Anyone on the link can advertise a service, with any name and TXT record.
        print(escape_nonprintable(f"{row['name']}  {where}  {row['fingerprint'] or 'no fingerprint'}  {paired}"))
    return 0


def _check_browse_timeout(timeout: float) -> None:
    if not math.isfinite(timeout) or timeout <= 0:
        raise ConfigError(f"--timeout must be a positive, finite number of seconds, not {timeout}")


def command_run(args: argparse.Namespace) -> int:
    from .run import command_run as run

    return run(args, _home(args))


def command_audit(args: argparse.Namespace) -> int:
    log = AuditLog(Path(args.file) if args.file else default_audit_path())
    return audit_command(log, args.action, args.since, args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpmsigner-agent", description="ssh-agent that forwards signatures to a tpmsigner signer."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--home",
        help="agent state directory (default: $TPMSIGNER_AGENT_HOME, else $XDG_DATA_HOME/tpmsigner-agent, "
        "else ~/.local/share/tpmsigner-agent)",
    )
    add_verbosity_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    id_parser = commands.add_parser("id", help="print this agent's Noise public key")
    id_parser.set_defaults(handler=command_id)

    trust = commands.add_parser("trust", help="pin a signer's address and Noise public key")
    trust.add_argument("name", help="a name for the signer")
    trust.add_argument(
        "address", help="HOST:PORT the signer listens on, or 'mdns' or '-' to find it over mDNS by its key"
    )
    trust.add_argument("key", help="the signer's key, as 'tpmsigner id' prints it")
    trust.add_argument("--replace", action="store_true", help="replace the key of an already pinned signer NAME")
    trust.set_defaults(handler=command_trust)
    signers_command.add_parsers(commands)

    pair = commands.add_parser("pair", help="pair with a signer's 'tpmsigner pair' window by comparing a code")
    pair.add_argument(
        "address", nargs="?", help="HOST:PORT of the pairing window (default: find it over mDNS)"
    )
    pair.add_argument("--name", help="a name for the signer (default: the name it proposes, its host name)")
    pair.add_argument(
        "--device-name", help="the device name this agent proposes to the signer (default: this host's name)"
    )
    pair.add_argument(
        "--signer-address",
        help="HOST:PORT where 'tpmsigner serve' listens, to pin (default: mdns, found by its key at each connection)",
    )
    _add_browse_options(pair, "seconds to look for the pairing window over mDNS")

    pair.set_defaults(handler=command_pair)

    discover = commands.add_parser("discover", help="list the signers that advertise themselves over mDNS")
    discover.add_argument("--json", action="store_true", help="print JSON instead of lines")
    _add_browse_options(discover, "seconds to listen for advertisements")
    discover.set_defaults(handler=command_discover)

    run = commands.add_parser(
        "run",
        help="serve the ssh-agent protocol on a UNIX socket",
        description="Serve the ssh-agent protocol on a UNIX socket. Without -D it forks, prints shell commands "
        "that set SSH_AUTH_SOCK and SSH_AGENT_PID, and exits, as ssh-agent does. Under systemd socket "
        "activation it serves the socket it was given, in the foreground.",
    )
    run.add_argument(
        "-a",
        "--socket",
        metavar="PATH",
        help="socket path (default: agent.sock in a new directory under $XDG_RUNTIME_DIR or /tmp, removed on exit)",
    )
    run.add_argument(
        "-D",
        "--foreground",
        action="store_true",
        help="stay in the foreground instead of printing SSH_AUTH_SOCK and forking; log to stderr",
    )
    run.add_argument("-d", "--debug", action="store_true", help="stay in the foreground and log debug messages")
    syntax = run.add_mutually_exclusive_group()
    syntax.add_argument(
        "-s", dest="shell", action="store_const", const=shell.SH, help="print Bourne shell commands (the default unless $SHELL ends in csh); in the foreground, print them only with -s or -c"
    )
    syntax.add_argument(
        "-c", dest="shell", action="store_const", const=shell.CSH, help="print C shell commands (the default when $SHELL ends in csh)"
    )
    run.add_argument(
        "-k",
        "--kill",
        action="store_true",
        help="stop the agent named by --pid-file, else by $SSH_AGENT_PID, and print commands that unset the variables",
    )
    run.add_argument(
        "--pid-file", metavar="FILE", help="write the agent's pid to FILE, removed when it stops; with -k, stop that agent"
    )
    run.add_argument(
        "--upstream",
        metavar="SOCKET",
        help="also offer the keys of the ssh-agent listening on SOCKET (OpenSSH's, gpg-agent's), "
        "for example --upstream \"$SSH_AUTH_SOCK\"",
    )
    run.add_argument(
        "--interface",
        action="append",
        default=[],
        metavar="ADDR",
        help="look for signers pinned with the address 'mdns' only on the interface with this IP address, or "
        "with this name; may be repeated (default: every interface)",
    )
    run.add_argument("--log-file", help="in the background, append the log to this file (default: discard it)")
    run.add_argument(
        "--audit-log", help="audit log file (default: $XDG_STATE_HOME/tpmsigner-agent/audit.jsonl)"
    )
    add_verbosity_options(run, subcommand=True)
    run.set_defaults(handler=command_run)

    audit = add_audit_parser(commands, "$XDG_STATE_HOME/tpmsigner-agent/audit.jsonl")
    audit.set_defaults(handler=command_audit)
    return parser


def _add_browse_options(parser: argparse.ArgumentParser, timeout_help: str) -> None:
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_BROWSE_TIMEOUT, help=f"{timeout_help} (default: {DEFAULT_BROWSE_TIMEOUT:g})"
    )
    parser.add_argument(
        "--interface",
        action="append",
        default=[],
        metavar="ADDR",
        help="use mDNS only on the interface with this IP address, or with this name; may be repeated "
        "(default: every interface)",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args_with_config(build_parser(), argv)
    if getattr(args, "debug", False):
        args.verbose = True
    return run_handler("tpmsigner-agent", args)


if __name__ == "__main__":
    sys.exit(main())
