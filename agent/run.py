"""``tpmsigner-agent run``: start the agent in the background or the foreground, or stop one with -k."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import ipaddress
import logging
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

from tpmsigner.audit import AuditLog
from tpmsigner.cliutil import serve_until_signal
from tpmsigner.errors import ConfigError, TpmSignerError
from tpmsigner.logsetup import configure_logging

from . import daemon, shell
from .activation import socket_path, take_activated_socket
from .audit import default_audit_path
from .config import AgentHome
from .socket_path import MAX_SOCKET_PATH, bind_agent_socket, default_socket_path
from .upstream import UpstreamAgent

logger = logging.getLogger("tpmsigner_agent")

# The signals that stop a serving agent, which then removes its socket.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class ListeningSocket:
    """The socket the agent serves on, and whether the agent created its path."""

    sock: socket.socket
    path: str
    # A socket passed by systemd belongs to its .socket unit, which
    # removes it; the agent must not unlink it on exit.
    owns_path: bool
    # The temporary directory made for a socket without --socket, which the
    # agent removes on exit, as ssh-agent does.  None for a path the user
    # named, whose directory stays even if the agent created it.
    temporary_directory: Path | None = None


def command_run(args: argparse.Namespace, home: AgentHome) -> int:
    syntax = shell.shell_syntax(args.shell, os.environ)
    if args.kill:
        return _kill(args, syntax)

    foreground = args.foreground or args.debug
    if args.log_file and foreground:
        raise ConfigError("--log-file applies to the background mode; in the foreground the log goes to stderr")
    home.static_key()  # create the key now, so a problem shows before forking
    home.signers()
    check_interfaces(args.interface)
    audit_path = Path(args.audit_log) if args.audit_log else default_audit_path()

    # From the moment the socket exists until the event loop handles them,
    # a stop signal would kill the agent and leave its socket and directory
    # behind.  So they stay blocked (pending, not lost) until the agent
    # serves; the background child inherits the mask across fork(2).
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    listening = _listening_socket(args)
    try:
        upstream = _upstream(args.upstream, listening.path)
    except ConfigError:
        _close(listening)
        raise
    if not listening.owns_path and not foreground:
        # The service manager supervises the process it started; a fork
        # would look to it like the agent exiting.
        logger.info("serving the socket passed by systemd in the foreground")
        foreground = True

    if foreground:
        try:
            if args.pid_file:
                daemon.write_pid_file(Path(args.pid_file), os.getpid())
            if args.shell is not None:
                print(shell.start_commands(syntax, listening.path, os.getpid(), with_pid_variable=False), end="", flush=True)
        except BaseException:
            _close(listening)
            raise
        _serve_and_clean_up(listening, home, audit_path, upstream, args.pid_file, args.interface)
        return 0

    pid = os.fork()
    if pid:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if args.pid_file:
            try:
                daemon.write_pid_file(Path(args.pid_file), pid)
            except (OSError, TpmSignerError):
                # Nobody could find or stop an agent whose pid was not
                # printed, so stop it before reporting the error.
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
                _close(listening)
                raise
        listening.sock.close()
        print(shell.start_commands(syntax, listening.path, pid), end="")
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
    configure_logging(logging.getLogger().level)  # stderr is now the log file, not the terminal or journal
    try:
        # The parent has written the pid file; this process removes it.
        _serve_and_clean_up(listening, home, audit_path, upstream, args.pid_file, args.interface)
    finally:
        os._exit(0)


def _listening_socket(args: argparse.Namespace) -> ListeningSocket:
    activated = take_activated_socket()
    if activated is not None:
        if args.socket:
            logger.warning("ignoring --socket %s: systemd passed the socket to serve", args.socket)
        return ListeningSocket(activated, socket_path(activated), owns_path=False)
    if args.socket:
        path = Path(args.socket)
        return ListeningSocket(bind_agent_socket(path), str(path), owns_path=True)

    path = default_socket_path()
    try:
        sock = bind_agent_socket(path)
    except ConfigError:
        _remove_empty_directory(path.parent)
        raise
    return ListeningSocket(sock, str(path), owns_path=True, temporary_directory=path.parent)


def check_interfaces(specs: list[str]) -> None:
    """Check ``--interface`` values at start, without importing zeroconf, which would slow the start.

    An IP address must belong to this host and a name must be an
    interface's.  Raises ConfigError naming the value otherwise.
    """
    for spec in specs:
        try:
            address = ipaddress.ip_address(spec)
        except ValueError:
            names = sorted(name for _, name in socket.if_nameindex())
            if spec not in names:
                raise ConfigError(
                    f"invalid --interface {spec!r}: not an IP address or an interface name ({', '.join(names)})"
                ) from None
            continue

        # Binding proves that the address is one of this host's, as
        # zeroconf's own bind to it would at the first lookup.
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((spec, 0))
            except OSError as exc:
                raise ConfigError(
                    f"invalid --interface {spec}: no interface of this host has that address "
                    f"({exc.strerror or exc}); give one of its addresses or its name"
                ) from None


def _upstream(path_text: str | None, own_path: str) -> UpstreamAgent | None:
    """Check ``--upstream`` and return the upstream agent, or None without the option."""
    if not path_text:
        return None
    path = Path(path_text)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(f"the --upstream path {path} is longer than the {MAX_SOCKET_PATH} bytes a UNIX socket path may have")
    if os.path.abspath(path) == os.path.abspath(own_path) or (
        path.exists() and Path(own_path).exists() and os.path.samefile(path, own_path)
    ):
        # Every request would come back to this agent, without end.
        raise ConfigError(f"--upstream {path} is this agent's own socket; name another agent's socket")

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as exc:
        logger.warning(
            "cannot reach the upstream agent at %s (%s); its keys are listed once it accepts connections",
            path,
            exc.strerror or exc,
        )
    finally:
        probe.close()
    return UpstreamAgent(path)


def _serve_and_clean_up(
    listening: ListeningSocket,
    home: AgentHome,
    audit_path: Path,
    upstream: UpstreamAgent | None,
    pid_file: str | None,
    mdns_interfaces: list[str],
) -> None:
    """Serve until SIGINT, SIGTERM or SIGHUP, then clean up.

    The cleanup removes the socket the agent created, its temporary
    directory and the pid file.
    """
    from .server import AgentServer

    signers = home.signers()
    if not signers:
        logger.warning("no signer is trusted yet; pin one with 'tpmsigner-agent trust NAME HOST:PORT KEY'")
    server = AgentServer(
        signers, home.static_key(), AuditLog(audit_path), upstream=upstream, mdns_interfaces=mdns_interfaces or None
    )

    async def start() -> None:
        await server.start(listening.sock)
        via = f" and upstream agent {upstream.path}" if upstream is not None else ""
        logger.info("agent listening on %s for %d signer(s)%s", listening.path, len(signers), via)
        # asyncssh checks session bindings and known_hosts at the first ssh
        # login. Importing it takes longer than the agent may take to start,
        # so it is imported now that the agent answers, not before.
        asyncio.get_running_loop().run_in_executor(None, importlib.import_module, "asyncssh")
        # The loop handles the stop signals now; one that arrived while
        # they were blocked is delivered here and stops the agent cleanly.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    try:
        serve_until_signal(start, server.close, STOP_SIGNALS)
    finally:
        _close(listening)
        if pid_file:
            daemon.remove_pid_file(Path(pid_file), os.getpid())
        logger.info("agent stopped")


def _close(listening: ListeningSocket) -> None:
    listening.sock.close()
    if listening.owns_path:
        try:
            Path(listening.path).unlink()
        except FileNotFoundError:
            pass
    if listening.temporary_directory is not None:
        _remove_empty_directory(listening.temporary_directory)


def _remove_empty_directory(directory: Path) -> None:
    """Remove the agent's temporary socket directory unless something else was put in it."""
    try:
        directory.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning(
            "cannot remove the temporary socket directory %s: %s; remove it by hand when the files in it are "
            "no longer needed",
            directory,
            exc.strerror or exc,
        )


def _kill(args: argparse.Namespace, syntax: str) -> int:
    pid = daemon.pid_to_kill(os.environ, args.pid_file)
    daemon.check_is_agent(pid)
    daemon.stop_agent(pid)
    if args.pid_file:
        daemon.remove_pid_file(Path(args.pid_file), pid)
    print(shell.kill_commands(syntax, pid), end="")
    return 0

