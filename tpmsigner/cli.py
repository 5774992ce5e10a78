"""The ``tpmsigner`` command: manage TPM identities and run the signer."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from .errors import TpmSignerError


def _configure_tss_logging() -> None:
    # tpm2-tss prints a WARNING for every TPM error response, including
    # each wrong PIN.  Our own log line reports the same failure more clearly.
    # TSS2_LOG is read when the library loads, so set it before the import.
    os.environ.setdefault("TSS2_LOG", "all+NONE")


def build_parser() -> argparse.ArgumentParser:
    from .commands import identities, signer, status

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
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    identities.add_parsers(commands)
    status.add_parsers(commands)
    signer.add_parsers(commands)
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
    except OSError as exc:
        # A file or socket the command needs: the path and the reason are
        # what a person can act on.
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"tpmsigner: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
