"""The ``tpmsigner`` command: manage TPM identities and run the signer."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .cliutil import add_verbosity_options, run_handler
from .config_file import parse_args_with_config


def _configure_tss_logging() -> None:
    # tpm2-tss prints a WARNING for every TPM error response, including
    # each wrong PIN.  Our own log line reports the same failure more clearly.
    # TSS2_LOG is read when the library loads, so set it before the import.
    os.environ.setdefault("TSS2_LOG", "all+NONE")


def build_parser() -> argparse.ArgumentParser:
    from .commands import certificates, identities, pairing, signer, status

    parser = argparse.ArgumentParser(prog="tpmsigner", description="SSH keys held in a TPM, approved per signature.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--home",
        help="key store directory (default: $TPMSIGNER_HOME, else $XDG_DATA_HOME/tpmsigner, "
        "else ~/.local/share/tpmsigner)",
    )
    parser.add_argument(
        "--tcti",
        help="TPM connection, e.g. device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321 "
        "(default: $TPMSIGNER_TCTI, else $TPM2TOOLS_TCTI, else device:/dev/tpmrm0)",
    )
    add_verbosity_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    identities.add_parsers(commands)
    certificates.add_parsers(commands)
    status.add_parsers(commands)
    signer.add_parsers(commands)
    pairing.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    _configure_tss_logging()
    return run_handler("tpmsigner", parse_args_with_config(build_parser(), argv))


if __name__ == "__main__":
    sys.exit(main())
