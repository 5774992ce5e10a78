"""Helpers shared by the subcommands: where things are, PINs, output."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from ..errors import ConfigError
from ..fsutil import read_secret_line
from ..store import KeyStore, TpmBinding, default_home
from ..tpm import DEFAULT_TCTI, Tpm


def resolve_tcti(option: str | None) -> str:
    """Return the TCTI: ``--tcti``, $TPMSIGNER_TCTI, $TPM2TOOLS_TCTI, or the kernel RM."""
    return option or os.environ.get("TPMSIGNER_TCTI") or os.environ.get("TPM2TOOLS_TCTI") or DEFAULT_TCTI


def resolve_home(option: str | None) -> Path:
    return Path(option) if option else default_home()


def key_store(args: argparse.Namespace) -> KeyStore:
    return KeyStore(resolve_home(args.home))


def open_tpm(args: argparse.Namespace, *, flush_stale_handles: bool = False) -> Tpm:
    """Return the TPM named by the options, bound to the home's recorded storage key."""
    binding = TpmBinding(resolve_home(args.home))
    return Tpm(resolve_tcti(args.tcti), flush_stale_handles=flush_stale_handles, parent_check=binding.check)


def read_pin(pin_file: str | None, prompt: str) -> bytes:
    """Read an existing PIN from a file, or once from the terminal."""
    if pin_file:
        pin = read_secret_line(Path(pin_file))
    else:
        if not sys.stdin.isatty():
            raise ConfigError("no terminal to ask for a PIN on; give it in a file with the --pin-file option")
        pin = getpass.getpass(prompt)
    if not pin:
        raise ConfigError("the PIN is empty")
    return pin.encode("utf-8")


def read_new_pin(pin_file: str | None, what: str = "the new key") -> bytes:
    """Read a new PIN from a file, or twice from the terminal."""
    if pin_file:
        pin = read_secret_line(Path(pin_file))
    else:
        if not sys.stdin.isatty():
            raise ConfigError("no terminal to ask for a PIN on; give one with --pin-file FILE")
        pin = getpass.getpass(f"PIN for {what}: ")
        if not pin:
            raise ConfigError("the PIN is empty; every key needs a PIN")
        if getpass.getpass("Repeat the PIN: ") != pin:
            raise ConfigError("the two PINs differ; nothing was changed")
    if not pin:
        raise ConfigError("the PIN is empty; every key needs a PIN")
    return pin.encode("utf-8")


def confirm(question: str, action: str) -> bool:
    """Ask a yes/no ``question`` on the terminal before ``action`` (a phrase such as "deleting X").

    Raises ConfigError without a terminal to ask on.
    """
    if not sys.stdin.isatty():
        raise ConfigError(f"{action} needs confirmation on a terminal; add --yes to confirm in advance")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


