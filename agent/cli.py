"""The ``tpmsigner-agent`` command."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import sys
from pathlib import Path

from tpmsigner import __version__
from tpmsigner.cliutil import run_handler, serve_until_signal
from tpmsigner.config_file import parse_args_with_config
from tpmsigner.errors import ConfigError
from tpmsigner.protocol.channel import format_public_key, public_key_fingerprint

from tpmsigner.audit import AuditLog, print_audit

from .audit import default_audit_path
from .config import AgentHome, default_home
from . import signers_command
from .discovery import DEFAULT_BROWSE_TIMEOUT
from .socket_path import bind_agent_socket, default_socket_path

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
    import asyncio

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
    import asyncio

    from tpmsigner.commands.common import print_json
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
        print(f"{row['name']}  {where}  {row['fingerprint'] or 'no fingerprint'}  {paired}")
    return 0


def _check_browse_timeout(timeout: float) -> None:
    if not math.isfinite(timeout) or timeout <= 0:
        raise ConfigError(f"--timeout must be a positive, finite number of seconds, not {timeout}")


def _serve(sock: socket.socket, path: Path, home: AgentHome, audit_path: Path) -> None:
    from .server import AgentServer

    signers = home.signers()
    if not signers:
        logger.warning("no signer is trusted yet; pin one with 'tpmsigner-agent trust NAME HOST:PORT KEY'")
    server = AgentServer(signers, home.static_key(), AuditLog(audit_path))

    async def start() -> None:
        await server.start(sock)
        logger.info("agent listening on %s for %d signer(s)", path, len(signers))

    try:
        serve_until_signal(start, server.close, (signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        logger.info("agent stopped")


def command_run(args: argparse.Namespace) -> int:
    home = _home(args)
    home.static_key()  # create the key now, so a problem shows before forking
    home.signers()
    if args.log_file and args.foreground:
        raise ConfigError("--log-file applies to the background mode; in the foreground the log goes to stderr")
    audit_path = Path(args.audit_log) if args.audit_log else default_audit_path()
    path = Path(args.socket) if args.socket else default_socket_path()
    sock = bind_agent_socket(path)

    if args.foreground:
        _serve(sock, path, home, audit_path)
        return 0

    pid = os.fork()
    if pid:
        sock.close()
        print(f"SSH_AUTH_SOCK={path}; export SSH_AUTH_SOCK;")
        print(f"SSH_AGENT_PID={pid}; export SSH_AGENT_PID;")
        print(f"echo Agent pid {pid};")
        return 0

    # Like ssh-agent, the background agent lets go of the terminal and of
    # the caller's pipes, so `eval "$(tpmsigner-agent run)"` and a caller
    # that captures stderr both return at once.  Its log goes to --log-file.
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    log_fd = os.open(args.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600) if args.log_file else devnull
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(log_fd, 2)
    os.close(devnull)
    try:
        _serve(sock, path, home, audit_path)
    finally:
        os._exit(0)


def command_audit(args: argparse.Namespace) -> int:
    log = AuditLog(Path(args.file) if args.file else default_audit_path())
    if args.action == "verify":
        result = log.verify()
        if result.ok:
            print(f"{log.path}: {result.lines} entries, chain intact")
            return 0
        print(f"{result.file}: line {result.first_bad_line}: {result.reason}", file=sys.stderr)
        return 1
    print_audit(log.records(), since=args.since, as_json=args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpmsigner-agent", description="ssh-agent that forwards signatures to a tpmsigner signer."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--home", help="agent state directory (default: $TPMSIGNER_AGENT_HOME, else $XDG_DATA_HOME/tpmsigner-agent)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
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

    run = commands.add_parser("run", help="serve the ssh-agent protocol on a UNIX socket")
    run.add_argument("--socket", help="socket path (default: a new directory under $XDG_RUNTIME_DIR or /tmp)")
    run.add_argument(
        "--foreground", action="store_true", help="stay in the foreground instead of printing SSH_AUTH_SOCK and forking"
    )
    run.add_argument("--log-file", help="in the background, append the log to this file (default: discard it)")
    run.add_argument(
        "--audit-log", help="audit log file (default: $XDG_STATE_HOME/tpmsigner-agent/audit.jsonl)"
    )
    run.set_defaults(handler=command_run)

    audit = commands.add_parser("audit", help="print the audit log, or check it with 'audit verify'")
    audit.add_argument("action", nargs="?", choices=["show", "verify"], default="show")
    audit.add_argument("--file", help="audit log file (default: $XDG_STATE_HOME/tpmsigner-agent/audit.jsonl)")
    audit.add_argument("--since", help="only entries at or after this ISO 8601 time, e.g. 2026-12-04T10:00")
    audit.add_argument("--json", action="store_true", help="print JSON lines as stored")
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
        help="use mDNS only on the interface with this IP address; may be repeated (default: every interface)",
    )


def main(argv: list[str] | None = None) -> int:
    return run_handler("tpmsigner-agent", parse_args_with_config(build_parser(), argv))


if __name__ == "__main__":
    sys.exit(main())
