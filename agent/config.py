"""The agent's home: its Noise key and the signers it trusts.

``signers.json``: ``{"version": 1, "signers": {NAME: {"address": "HOST:PORT",
"key": KEY}}}`` with KEY in the form that ``tpmsigner id`` prints.  The
address ``mdns`` means the signer has no fixed address: the agent finds it
over mDNS by the fingerprint of KEY each time it connects.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tpmsigner.errors import ConfigError
from tpmsigner.fsutil import ensure_private_dir, write_private_file
from tpmsigner.jsonutil import parse_json
from tpmsigner.protocol.channel import StaticKey, format_public_key, parse_public_key, public_key_fingerprint

SIGNERS_VERSION = 1
NOISE_KEY_FILE = "noise-static-key.pem"
SIGNERS_FILE = "signers.json"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
MDNS_ADDRESS = "mdns"
# Seconds to listen for mDNS advertisements (pair, discover).  It lives here
# rather than in .discovery so that the agent starts without importing zeroconf.
DEFAULT_BROWSE_TIMEOUT = 3.0


def default_home() -> Path:
    """Return ``$TPMSIGNER_AGENT_HOME``, else ``$XDG_DATA_HOME/tpmsigner-agent``."""
    if os.environ.get("TPMSIGNER_AGENT_HOME"):
        return Path(os.environ["TPMSIGNER_AGENT_HOME"])
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data_home) / "tpmsigner-agent"


def parse_address(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6addr]:PORT`` for IPv6)."""
    host, separator, port = value.rpartition(":")
    # The length check keeps int() away from digit strings longer than
    # the 4300 digits it converts, which raise ValueError.
    valid_port = port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535
    if not separator or not host or not valid_port or any(character.isspace() for character in host):
        raise ConfigError(
            f"invalid address {value!r}: use HOST:PORT with a port from 1 to 65535, for example 192.0.2.7:7810"
        )
    host = host.strip("[]")
    _check_link_local_scope(value, host, port)
    return host, int(port)


def _check_link_local_scope(value: str, host: str, port: str) -> None:
    """Raise ConfigError for an IPv6 link-local host without a ``%scope``, which Linux connect() rejects with EINVAL."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return
    if address.version == 6 and address.is_link_local and not address.scope_id:
        raise ConfigError(
            f"invalid address {value!r}: an IPv6 link-local address needs a scope, the interface to reach it on, "
            f"for example [{host}%eth0]:{port}"
        )


def parse_signer_address(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT``, or return ``("", 0)`` for ``mdns`` (or ``-``): an address found over mDNS."""
    if value in (MDNS_ADDRESS, "-"):
        return "", 0
    return parse_address(value)


@dataclass(frozen=True)
class PinnedSigner:
    """A signer the agent talks to, and the Noise key it must present.

    ``host`` is empty and ``port`` 0 for a signer found over mDNS.
    """

    name: str
    host: str
    port: int
    public_key: bytes

    @property
    def uses_mdns(self) -> bool:
        return not self.host

    @property
    def address(self) -> str:
        if self.uses_mdns:
            return MDNS_ADDRESS
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class AgentHome:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def static_key(self) -> StaticKey:
        ensure_private_dir(self.path)
        return StaticKey.load_or_create(self.path / NOISE_KEY_FILE)

    def signers(self) -> list[PinnedSigner]:
        """Return the pinned signers; raise ConfigError, naming the file and the fix, if it is invalid."""
        path = self.path / SIGNERS_FILE
        if not path.exists():
            return []

        def invalid(reason: str) -> ConfigError:
            return ConfigError(
                f"cannot read the trusted signers file {path}: {reason}; correct the file, or move it away "
                "and pair the signers again with 'tpmsigner-agent pair' or 'tpmsigner-agent trust'"
            )

        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise invalid(exc.strerror or str(exc)) from None
        except UnicodeDecodeError:
            raise invalid("the file is not UTF-8 text") from None
        try:
            record = parse_json(text)
        except ValueError as exc:
            raise invalid(f"not valid JSON ({exc})") from None
        try:
            return _parse_signers(record)
        except (ValueError, ConfigError) as exc:
            raise invalid(str(exc)) from None

    def check_trust(self, name: str, public_key: bytes, replace: bool = False) -> None:
        """Raise ConfigError if pinning ``public_key`` as ``name`` would be rejected."""
        _check_name(name)
        previous = next((pinned for pinned in self.signers() if pinned.name == name), None)
        if previous is not None and previous.public_key != public_key and not replace:
            raise ConfigError(
                f"signer {name!r} is already pinned with key {public_key_fingerprint(previous.public_key)}; "
                "to replace that key, run the command again with --replace"
            )

    def trust(self, name: str, address: str, key_text: str, replace: bool = False) -> PinnedSigner:
        """Pin a signer under ``name``; ``address`` is HOST:PORT, or ``mdns`` (or ``-``) to find it over mDNS.

        An earlier entry of that name with another key is replaced only when
        ``replace`` is true; a new address for the same key is always taken.
        """
        _check_name(name)
        host, port = parse_signer_address(address)
        signer = PinnedSigner(name, host, port, parse_public_key(key_text))
        self.check_trust(name, signer.public_key, replace)
        existing = {pinned.name: pinned for pinned in self.signers()}
        entries = {s.name: {"address": s.address, "key": format_public_key(s.public_key)} for s in existing.values()}
        entries[name] = {"address": signer.address, "key": format_public_key(signer.public_key)}
        ensure_private_dir(self.path)
        text = json.dumps({"version": SIGNERS_VERSION, "signers": entries}, indent=2, sort_keys=True) + "\n"
        write_private_file(self.path / SIGNERS_FILE, text.encode("utf-8"))
        return signer


def _parse_signers(record: object) -> list[PinnedSigner]:
    """Return the signers of a parsed signers.json; raise ValueError or ConfigError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError("the file must contain a JSON object")
    if record.get("version") != SIGNERS_VERSION:
        raise ValueError(f"unsupported version {record.get('version')!r}, expected {SIGNERS_VERSION}")
    entries = record.get("signers")
    if not isinstance(entries, dict):
        raise ValueError("'signers' must be a JSON object of signer names")
    signers = []
    for name, entry in sorted(entries.items()):
        if not isinstance(entry, dict):
            raise ValueError(f"signer {name!r}: expected an object with an 'address' and a 'key'")
        for field in ("address", "key"):
            if not isinstance(entry.get(field), str):
                raise ValueError(f"signer {name!r}: {field!r} must be a string")
        host, port = parse_signer_address(entry["address"])
        signers.append(PinnedSigner(name, host, port, parse_public_key(entry["key"])))
    return signers


def _check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"invalid signer name {name!r}: use 1 to 64 letters, digits or . _ @ + -, "
            "starting with a letter or digit"
        )
