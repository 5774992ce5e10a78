"""The ``tpmsigner-agent`` command."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from tpmsigner import __version__
from tpmsigner.cliutil import run_handler, serve_until_signal
from tpmsigner.errors import ConfigError
from tpmsigner.protocol.channel import format_public_key, public_key_fingerprint

from .config import AgentHome, default_home
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


def _serve(sock: socket.socket, path: Path, home: AgentHome) -> None:
    from .server import AgentServer

    signers = home.signers()
    if not signers:
        logger.warning("no signer is trusted yet; pin one with 'tpmsigner-agent trust NAME HOST:PORT KEY'")
    server = AgentServer(signers, home.static_key())

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
    path = Path(args.socket) if args.socket else default_socket_path()
    sock = bind_agent_socket(path)

    if args.foreground:
        _serve(sock, path, home)
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
        _serve(sock, path, home)
    finally:
        os._exit(0)


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
    trust.add_argument("address", help="HOST:PORT the signer listens on")
    trust.add_argument("key", help="the signer's key, as 'tpmsigner id' prints it")
    trust.add_argument("--replace", action="store_true", help="replace the key of an already pinned signer NAME")
    trust.set_defaults(handler=command_trust)

    run = commands.add_parser("run", help="serve the ssh-agent protocol on a UNIX socket")
    run.add_argument("--socket", help="socket path (default: a new directory under $XDG_RUNTIME_DIR or /tmp)")
    run.add_argument(
        "--foreground", action="store_true", help="stay in the foreground instead of printing SSH_AUTH_SOCK and forking"
    )
    run.add_argument("--log-file", help="in the background, append the log to this file (default: discard it)")
    run.set_defaults(handler=command_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_handler("tpmsigner-agent", build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
