"""id, allow and serve: the signer's Noise identity, its devices, and the server."""

from __future__ import annotations

import argparse
import asyncio
import errno
import fcntl
import hashlib
import logging
import math
import os
import socket
import struct
import sys
from pathlib import Path

from ..audit import AuditLog
from ..cliutil import add_verbosity_options, serve_until_signal
from ..discovery import SIGNER_SERVICE, Advertiser
from ..errors import ConfigError
from ..fsutil import ensure_private_dir
from ..protocol.channel import StaticKey, format_public_key, parse_public_key, public_key_fingerprint
from ..signer.approvers import DEFAULT_APPROVAL_TIMEOUT, Approver, approver_from_spec, check_approver
from ..signer.admission import MAX_HANDSHAKE_ATTEMPTS
from ..signer.devices import DeviceRegistry
from ..signer.notify import DesktopNotifier
from ..signer.refusals import DEFAULT_REFUSAL_LIMIT, DEFAULT_REFUSAL_PAUSE, MAX_REFUSAL_PAUSE, RefusalPolicy
from ..signer.server import SignerConfig, SignerServer
from ..signer.worker import TPM_CALL_TIMEOUT, TpmWorker
from ..store import TpmBinding
from ..tcti import has_resource_manager, tpm_identity
from .common import key_store, open_tpm, resolve_home

logger = logging.getLogger("tpmsigner")

NOISE_KEY_FILE = "noise-static-key.pem"
DEVICES_FILE = "devices.json"
AUDIT_FILE = "audit.jsonl"
# Held with flock(2) by the one serve process that runs on a home.
SERVE_LOCK_FILE = "serve.lock"
# The prefix of the abstract UNIX socket (unix(7)) that one serve binds per
# TPM without a resource manager.  The kernel releases it when the process
# ends, however it ends.
TPM_LOCK_PREFIX = b"\0tpmsigner-serve-tpm:"


def _static_key(home: Path) -> StaticKey:
    ensure_private_dir(home)
    return StaticKey.load_or_create(home / NOISE_KEY_FILE)


def command_id(args: argparse.Namespace) -> int:
    print(format_public_key(_static_key(resolve_home(args.home)).public))
    return 0


def command_allow(args: argparse.Namespace) -> int:
    home = resolve_home(args.home)
    ensure_private_dir(home)
    device = DeviceRegistry(home / DEVICES_FILE).allow(args.name, parse_public_key(args.key), replace=args.replace)
    print(f"allowed device {device.name!r} with key {public_key_fingerprint(device.public_key)}", file=sys.stderr)
    return 0


def parse_listen(value: str) -> tuple[str, int]:
    host, separator, port = value.rpartition(":")
    valid_port = port.isascii() and port.isdigit() and len(port) <= 5 and 0 <= int(port) <= 65535
    if not separator or not host or not valid_port or any(character.isspace() for character in host):
        raise ConfigError(f"invalid --listen {value!r}: use HOST:PORT with a port from 0 to 65535, e.g. 127.0.0.1:7810")
    return host.strip("[]"), int(port)


def command_serve(args: argparse.Namespace) -> int:
    home = resolve_home(args.home)
    host, port = parse_listen(args.listen)
    if not math.isfinite(args.approval_timeout) or args.approval_timeout <= 0:
        raise ConfigError(f"--approval-timeout must be a positive, finite number of seconds, not {args.approval_timeout}")
    if args.refusal_limit < 1:
        raise ConfigError(f"--refusal-limit must be at least 1, not {args.refusal_limit}")
    if not math.isfinite(args.refusal_pause) or not 0 < args.refusal_pause <= MAX_REFUSAL_PAUSE:
        raise ConfigError(f"--refusal-pause must be between 0 and {MAX_REFUSAL_PAUSE:g} seconds, not {args.refusal_pause}")
    if args.max_handshakes_per_minute < 1:
        raise ConfigError(f"--max-handshakes-per-minute must be at least 1, not {args.max_handshakes_per_minute}")
    if not math.isfinite(args.tpm_timeout) or args.tpm_timeout <= 0:
        raise ConfigError(f"--tpm-timeout must be a positive, finite number of seconds, not {args.tpm_timeout}")
    config = SignerConfig(
        host=host,
        port=port,
        approval_timeout=args.approval_timeout,
        refusals=RefusalPolicy(limit=args.refusal_limit, pause=args.refusal_pause),
        handshake_attempts=args.max_handshakes_per_minute,
    )
    approver = approver_from_spec(args.approver, timeout=args.approval_timeout)
    check_approver(approver)
    notifier = DesktopNotifier.find() if args.notify else None
    static_key = _static_key(home)
    # A damaged devices.json would otherwise reject every agent at its handshake.
    DeviceRegistry(home / DEVICES_FILE).load()
    lock = _lock_home(home)

    # serve owns the TPM while it runs, so on a TPM without a resource
    # manager it flushes what a killed earlier run left loaded.  Nothing is
    # sent to the TPM before _serve has bound the listening address.
    worker = TpmWorker(open_tpm(args, flush_stale_handles=True), timeout=args.tpm_timeout)
    try:
        _serve(args, home, config, approver, notifier, static_key, worker)
    finally:
        worker.close()
        os.close(lock)
    return 0


def _lock_home(home: Path) -> int:
    """Take the home's serve lock (flock on HOME/serve.lock) for as long as this process runs.

    Two serve processes on one home would serve the same keys, and on
    a TPM without a resource manager each one's start flushes the other's
    storage key and session.  Return the lock's file descriptor.
    """
    path = home / SERVE_LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 32).decode("ascii", errors="replace").strip()
        os.close(descriptor)
        raise ConfigError(
            f"another 'tpmsigner serve' (pid {holder or 'unknown'}) is running with the home {home}; "
            "stop it first, or give this one another --home"
        ) from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{os.getpid()}\n".encode("ascii"))
    return descriptor


def _serve(
    args: argparse.Namespace,
    home: Path,
    config: SignerConfig,
    approver: Approver,
    notifier: DesktopNotifier | None,
    static_key: StaticKey,
    worker: TpmWorker,
) -> None:
    server = SignerServer(
        store=key_store(args),
        worker=worker,
        static_key=static_key,
        devices=DeviceRegistry(home / DEVICES_FILE),
        approver=approver,
        config=config,
        audit_log=AuditLog(home / AUDIT_FILE),
        notifier=notifier,
    )

    advertiser: Advertiser | None = None
    tpm_lock: socket.socket | None = None

    async def start() -> None:
        nonlocal advertiser, tpm_lock

        # The address is bound first: a busy port means another serve may
        # be running on this TPM, and the first TPM call below flushes every
        # transient object and session on a TPM without a resource manager.
        try:
            await server.bind()
        except OSError as exc:
            raise ConfigError(_listen_error(args.listen, exc)) from None

        try:
            tpm_lock = _lock_tpm(worker.tpm.tcti)
            if tpm_lock is not None:
                asyncio.get_running_loop().add_reader(tpm_lock.fileno(), _close_claim_probe, tpm_lock)
            await _check_tpm(home, worker)
        except BaseException:
            await server.close()
            raise

        await server.start()
        if args.mdns:
            advertiser = Advertiser(
                SIGNER_SERVICE, server.port, public_key_fingerprint(static_key.public), config.host, args.interface
            )
            await advertiser.start()

    async def close() -> None:
        if advertiser is not None:
            await advertiser.close()
        await server.close()
        if tpm_lock is not None:
            asyncio.get_running_loop().remove_reader(tpm_lock.fileno())
            tpm_lock.close()

    serve_until_signal(start, close)


def _lock_tpm(tcti: str) -> socket.socket | None:
    """Claim the TPM that ``tcti`` reaches for this serve, if it has no resource manager.

    serve flushes every transient object and session on such a TPM when it
    connects, so two serve processes on one TPM, even with different homes,
    would flush each other's storage key and session at every start and
    reconnection.  Return the socket that is the claim, or None for a
    TPM behind a resource manager, which needs none.
    """
    if has_resource_manager(tcti):
        return None
    identity = tpm_identity(tcti)
    name = TPM_LOCK_PREFIX + hashlib.sha256(identity.encode("utf-8")).hexdigest().encode("ascii")
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(name)
        # Listening lets a second serve ask the kernel which process has the claim.
        claim.listen(1)
        claim.setblocking(False)
        return claim
    except OSError as exc:
        claim.close()
        if exc.errno != errno.EADDRINUSE:
            raise ConfigError(f"cannot claim the TPM at TCTI {tcti!r} for this serve: {exc.strerror or exc}") from None
    holder = _claim_holder(name)
    raise ConfigError(
        f"another 'tpmsigner serve' ({holder}) uses the TPM at TCTI {tcti!r}, which has no resource manager, "
        "so each would flush the other's storage key and session; stop it first, or reach the TPM through a "
        "resource manager (/dev/tpmrm0 or tpm2-abrmd)"
    )


def _close_claim_probe(claim: socket.socket) -> None:
    """Accept and close a second serve's probe, so that probes never fill the listen backlog."""
    try:
        connection, _ = claim.accept()
    except OSError:
        return
    connection.close()


def _claim_holder(name: bytes) -> str:
    """Describe the process that has bound the abstract socket ``name``, from its SO_PEERCRED credentials."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(name)
        pid, uid, _ = struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return f"pid {pid}, uid {uid}"
    except OSError:
        return "pid unknown"
    finally:
        probe.close()


def _listen_error(listen: str, exc: OSError) -> str:
    # asyncio replaces the text of a failed bind with its own long message,
    # so the reason comes from the errno.  getaddrinfo errors have negative
    # EAI_* codes instead, with their text in strerror.
    if isinstance(exc, socket.gaierror) or not exc.errno:
        return f"cannot listen on {listen}: {exc.strerror or exc}"
    message = f"cannot listen on {listen}: {os.strerror(exc.errno)}"
    if exc.errno == errno.EADDRINUSE:
        message += "; if another tpmsigner serve uses this address, stop it first or choose another --listen port"
    return message


async def _check_tpm(home: Path, worker: TpmWorker) -> None:
    """Check that the TPM responds and has the recorded storage key, so serve fails at start, not at a request.

    The calls go through the worker, so a TPM that does not respond stops
    serve after --tpm-timeout instead of hanging it.
    """
    await worker.call(worker.tpm.check_parents, [int(handle, 16) for handle in TpmBinding(home).recorded()])
    if (await worker.call(worker.tpm.lockout_status)).in_lockout:
        logger.warning("the TPM is in dictionary-attack lockout; requests are rejected until it ends")


def add_parsers(commands) -> None:
    id_parser = commands.add_parser("id", help="print this signer's Noise public key")
    id_parser.set_defaults(handler=command_id)

    allow = commands.add_parser("allow", help="trust an agent's Noise public key under a device name")
    allow.add_argument("name", help="device name shown in approval prompts")
    allow.add_argument("key", help="the agent's key, as 'tpmsigner-agent id' prints it")
    allow.add_argument("--replace", action="store_true", help="replace the key of an already allowed device NAME")
    allow.set_defaults(handler=command_allow)

    serve = commands.add_parser("serve", help="serve agents over Noise, asking for approval per signature")
    serve.add_argument("--listen", required=True, help="HOST:PORT to listen on, e.g. 127.0.0.1:7810")
    serve.add_argument(
        "--approver",
        required=True,
        metavar="APPROVER",
        help="who gives the PIN for each signature: 'tty' (the terminal running serve), 'command:PROGRAM' "
        "(PROGRAM prints the PIN; details in TPMSIGNER_* variables), 'pinentry[:PROGRAM]' (a pinentry dialog; "
        "default program: pinentry on PATH) or 'askpass[:PROGRAM]' (an SSH_ASKPASS program; default: "
        "$SSH_ASKPASS)",
    )
    serve.add_argument(
        "--approval-timeout",
        type=float,
        default=DEFAULT_APPROVAL_TIMEOUT,
        help=f"seconds to wait for an approval before refusing (default: {DEFAULT_APPROVAL_TIMEOUT:g})",
    )
    serve.add_argument(
        "--refusal-limit",
        type=int,
        default=DEFAULT_REFUSAL_LIMIT,
        metavar="N",
        help="after N refusals in a row from one device, refuse its requests without asking for a while "
        f"(default: {DEFAULT_REFUSAL_LIMIT})",
    )
    serve.add_argument(
        "--refusal-pause",
        type=float,
        default=DEFAULT_REFUSAL_PAUSE,
        metavar="SECONDS",
        help="the first such pause; it doubles with each further refusal, up to "
        f"{MAX_REFUSAL_PAUSE:g} s (default: {DEFAULT_REFUSAL_PAUSE:g})",
    )
    serve.add_argument(
        "--max-handshakes-per-minute",
        type=int,
        default=MAX_HANDSHAKE_ATTEMPTS,
        metavar="N",
        help="close connections from a source address beyond N handshake attempts in any 60 s "
        f"(default: {MAX_HANDSHAKE_ATTEMPTS})",
    )
    serve.add_argument(
        "--tpm-timeout",
        type=float,
        default=TPM_CALL_TIMEOUT,
        help="seconds to wait for the TPM's response to one call before failing the request; while that "
        f"call has no response, later requests fail at once (default: {TPM_CALL_TIMEOUT:g})",
    )
    serve.add_argument(
        "--notify",
        action="store_true",
        help="show a desktop notification with notify-send after each signature, and after each refusal "
        "once an approver was asked",
    )
    add_mdns_options(serve, "_tpmsigner._tcp")
    add_verbosity_options(serve, subcommand=True)
    serve.set_defaults(handler=command_serve)


def add_mdns_options(parser: argparse.ArgumentParser, service: str) -> None:
    parser.add_argument(
        "--no-mdns", dest="mdns", action="store_false", help=f"do not advertise {service} over mDNS (zeroconf)"
    )
    parser.add_argument(
        "--interface",
        action="append",
        default=[],
        metavar="ADDR",
        help="advertise over mDNS only on the interface with this IP address, or with this name; may be repeated "
        "(default: the interface of the --listen address, or every interface when listening on all)",
    )
