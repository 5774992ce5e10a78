"""Classify TCTI strings by the path their commands take to the TPM.

A TCTI string is ``NAME[:CONFIG]``, split at the first colon, as
tpm2-tss's tctildr and tpm2-pytss's ``TCTILdr.parse`` split it.  NAME is
a short name such as ``swtpm``, or the file name or path of the TCTI
library, ``libtss2-tcti-swtpm.so.0``: tctildr dlopens NAME itself before
it tries ``libtss2-tcti-NAME.so.0`` and ``libtss2-tcti-NAME.so``.
"""

from __future__ import annotations

import os

# TCTIs that send commands straight to a TPM, a TPM chip's bus or an
# emulator, so that transient objects and sessions outlive the process
# that loaded them and every client shares the TPM's few object slots.
_DIRECT_TCTIS = frozenset(
    {
        "swtpm",
        "mssim",
        "libtpms",
        "spi-helper",
        "i2c-helper",
        "spi-ltt2go",
        "spi-lt2go",
        "spi-ftdi",
        "i2c-ftdi",
        "spidev",
    }
)
# The pcap TCTI records the commands of a child TCTI, whose whole TCTI
# string is pcap's CONFIG (tpm2-tss, src/tss2-tcti/tcti-pcap.c).
_PCAP_TCTI = "pcap"
_DEVICE_TCTI = "device"
# The TCTIs that reach an emulator over TCP, with their default ports.
_SOCKET_TCTIS = {"swtpm": 2321, "mssim": 2321}
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_LIBRARY_PREFIX = "libtss2-tcti-"
_LIBRARY_SUFFIXES = (".so.0", ".so")


def has_resource_manager(tcti: str) -> bool:
    """Return whether commands sent through ``tcti`` pass a resource manager before they reach the TPM.

    A resource manager (the kernel's /dev/tpmrmN, tpm2-abrmd) gives each
    client its own transient objects and sessions, swaps them out of the
    TPM between commands and flushes them when the client goes away.
    ``device`` without a path counts as /dev/tpmrm0, the first device file
    that the device TCTI of tpm2-tss 3.2 tries.
    """
    name, _, config = tcti.partition(":")
    name = _short_name(name)

    if name == _PCAP_TCTI:
        # With no child TCTI, tctildr picks its default.  tpm2-tss 3.2 tries
        # libtss2-tcti-default.so, tpm2-abrmd and /dev/tpmrm0 before
        # /dev/tpm0 and the emulators.
        return has_resource_manager(config) if config else True
    if name == _DEVICE_TCTI:
        return not config or os.path.basename(config).startswith("tpmrm")
    # NOTE: names not listed here, such as cmd (a TCTI that runs a
    # program), count as having a resource manager, because there is no
    # way to tell from the string.
    return name not in _DIRECT_TCTIS


def tpm_identity(tcti: str) -> str:
    """Return a string naming the TPM that ``tcti`` reaches, for telling whether two TCTI strings share one.

    Spellings that differ only in defaults or key order give the same
    string: ``swtpm``, ``swtpm:port=2321`` and ``swtpm:port=2321,host=localhost``.
    """
    name, _, config = tcti.partition(":")
    name = _short_name(name)

    if name == _PCAP_TCTI and config:
        return tpm_identity(config)
    if name == _DEVICE_TCTI:
        return f"{name}:{os.path.realpath(config or '/dev/tpmrm0')}"
    if name in _SOCKET_TCTIS:
        # The swtpm and mssim TCTIs of tpm2-tss take comma-separated
        # key=value pairs, and default to localhost and port 2321.
        settings = {"host": "localhost", "port": str(_SOCKET_TCTIS[name])}
        for item in filter(None, config.split(",")):
            key, _, value = item.partition("=")
            settings[key.strip()] = value.strip()
        host = settings["host"].lower().strip("[]")
        # NOTE: other names for the same host (an address of this machine
        # other than loopback) are not recognised as the same TPM.
        if host in _LOOPBACK_NAMES:
            host = "loopback"
        return f"{name}:{host}:{settings['port']}"
    return f"{name}:{config}"


def _short_name(name: str) -> str:
    """Return the short TCTI name for a library file name or path, e.g. ``swtpm`` for ``libtss2-tcti-swtpm.so.0``."""
    base = os.path.basename(name)
    if not base.startswith(_LIBRARY_PREFIX):
        return name
    base = base[len(_LIBRARY_PREFIX) :]
    for suffix in _LIBRARY_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base
