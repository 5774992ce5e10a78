"""The ``tpmsigner`` command: manage TPM identities and run the signer."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import signal
import sys
from pathlib import Path

from . import __version__
from .errors import ConfigError, TpmSignerError
from .fsutil import ensure_private_dir, read_secret_line

logger = logging.getLogger("tpmsigner")

NOISE_KEY_FILE = "noise-static-key.pem"
DEVICES_FILE = "devices.json"


def _configure_tss_logging() -> None:
    # tpm2-tss prints a WARNING for every TPM error response, including
    # each wrong PIN.  Our own log line reports the same failure more clearly.
    # TSS2_LOG is read when the library loads, so set it before the import.
    os.environ.setdefault("TSS2_LOG", "all+NONE")


def resolve_tcti(option: str | None) -> str:
    """Return the TCTI: ``--tcti``, $TPMSIGNER_TCTI, $TPM2TOOLS_TCTI, or the kernel RM."""
    from .tpm import DEFAULT_TCTI

    return option or os.environ.get("TPMSIGNER_TCTI") or os.environ.get("TPM2TOOLS_TCTI") or DEFAULT_TCTI


def resolve_home(option: str | None) -> Path:
    from .store import default_home

    return Path(option) if option else default_home()


def read_new_pin(pin_file: str | None) -> bytes:
    """Read a new key's PIN from a file, or twice from the terminal."""
    if pin_file:
        pin = read_secret_line(Path(pin_file))
    else:
        if not sys.stdin.isatty():
            raise ConfigError("no terminal to ask for a PIN on; give one with --pin-file FILE")
        pin = getpass.getpass("PIN for the new key: ")
        if getpass.getpass("Repeat the PIN: ") != pin:
            raise ConfigError("the two PINs differ; nothing was created")
    if not pin:
        raise ConfigError("the PIN is empty; every key needs a PIN")
    return pin.encode("utf-8")


def command_keygen(args: argparse.Namespace) -> int:
    from .identities import create_identity
    from .keytypes import key_type_by_name
    from .store import KeyStore, validate_label
    from .tpm import Tpm

    label = validate_label(args.label)
    key_type = key_type_by_name(args.type)
    store = KeyStore(resolve_home(args.home))
    store.ensure_label_free(label)
    pin = read_new_pin(args.pin_file)
    with Tpm(resolve_tcti(args.tcti)) as tpm:
        print(f"creating an {key_type.description} key in the TPM at {tpm.tcti} ...", file=sys.stderr)
        identity = create_identity(tpm, store, label, pin, key_type)
    print(f"created identity {label!r}, {identity.fingerprint}", file=sys.stderr)
    print(identity.openssh_line())
    return 0


def command_list(args: argparse.Namespace) -> int:
    from .store import KeyStore

    identities = KeyStore(resolve_home(args.home)).list()
    if not identities:
        print("no identities; create one with 'tpmsigner keygen LABEL'", file=sys.stderr)
        return 0
    rows = [(i.label, i.key_type, i.fingerprint, "enabled" if i.enabled else "disabled") for i in identities]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for row in rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}")
    return 0


def _static_key(home: Path):
    from .protocol.channel import StaticKey

    ensure_private_dir(home)
    return StaticKey.load_or_create(home / NOISE_KEY_FILE)


def command_id(args: argparse.Namespace) -> int:
    from .protocol.channel import format_public_key

    print(format_public_key(_static_key(resolve_home(args.home)).public))
    return 0


def command_allow(args: argparse.Namespace) -> int:
    from .protocol.channel import parse_public_key, public_key_fingerprint
    from .signer.devices import DeviceRegistry

    home = resolve_home(args.home)
    ensure_private_dir(home)
    device = DeviceRegistry(home / DEVICES_FILE).allow(args.name, parse_public_key(args.key), replace=args.replace)
    print(f"allowed device {device.name!r} with key {public_key_fingerprint(device.public_key)}", file=sys.stderr)
    return 0


def _parse_listen(value: str) -> tuple[str, int]:
    host, separator, port = value.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"invalid --listen {value!r}: use HOST:PORT, for example 127.0.0.1:7810")
    return host.strip("[]"), int(port)


def command_serve(args: argparse.Namespace) -> int:
    from .signer.approvers import approver_from_spec, check_approver
    from .signer.devices import DeviceRegistry
    from .signer.server import SignerConfig, SignerServer
    from .signer.worker import TpmWorker
    from .store import KeyStore
    from .tpm import Tpm

    home = resolve_home(args.home)
    host, port = _parse_listen(args.listen)
    if args.approval_timeout <= 0:
        raise ConfigError("--approval-timeout must be a positive number of seconds")
    approver = approver_from_spec(args.approver, timeout=args.approval_timeout)
    check_approver(approver)
    static_key = _static_key(home)
    # serve owns the TPM while it runs, so on an emulator without a resource
    # manager it may flush what a killed earlier run left loaded.
    tpm = Tpm(resolve_tcti(args.tcti), flush_stale_handles=True)
    # Fail now, not at the first request, if the TPM cannot be reached.
    lockout = tpm.lockout_status()
    if lockout.in_lockout:
        logger.warning("the TPM is in dictionary-attack lockout; requests are rejected until it ends")
    worker = TpmWorker(tpm)
    server = SignerServer(
        store=KeyStore(home),
        worker=worker,
        static_key=static_key,
        devices=DeviceRegistry(home / DEVICES_FILE),
        approver=approver,
        config=SignerConfig(host=host, port=port, approval_timeout=args.approval_timeout),
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signal_number, stop.set)
        await server.start()
        try:
            await stop.wait()
        finally:
            await server.close()

    try:
        asyncio.run(run())
    finally:
        worker.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpmsigner", description="SSH keys held in a TPM, approved per signature.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--home", help="key store directory (default: $TPMSIGNER_HOME, else $XDG_DATA_HOME/tpmsigner)")
    parser.add_argument(
        "--tcti",
        help="TPM connection, e.g. device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321 "
        "(default: $TPMSIGNER_TCTI, else $TPM2TOOLS_TCTI, else device:/dev/tpmrm0)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    list_parser.set_defaults(handler=command_list)

    id_parser = commands.add_parser("id", help="print this signer's Noise public key")
    id_parser.set_defaults(handler=command_id)

    allow = commands.add_parser("allow", help="trust an agent's Noise public key under a device name")
    allow.add_argument("name", help="device name shown in approval prompts")
    allow.add_argument("key", help="the agent's key, as 'tpmsigner-agent id' prints it")
    allow.add_argument("--replace", action="store_true", help="replace the key of an already allowed device NAME")
    allow.set_defaults(handler=command_allow)

    serve = commands.add_parser("serve", help="serve agents over Noise, asking for approval per signature")
    serve.add_argument("--listen", required=True, help="HOST:PORT to listen on, e.g. 127.0.0.1:7810")
    serve.add_argument("--approver", required=True, help="'tty' or 'command:PROGRAM'")
    serve.add_argument(
        "--approval-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for an approval before refusing (default: 60)",
    )
    serve.set_defaults(handler=command_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    _configure_tss_logging()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.handler(args)
    except (TpmSignerError, ValueError) as exc:
        print(f"tpmsigner: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
