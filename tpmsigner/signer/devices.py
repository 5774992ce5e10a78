"""Agents the signer trusts, by device name and Noise static key.

Stored as ``HOME/devices.json``: ``{"version": 1, "devices": {NAME: KEY}}``
with KEY in the text form that ``tpmsigner-agent id`` prints.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..fsutil import ensure_private_dir, write_private_file
from ..protocol.channel import format_public_key, parse_public_key, public_key_fingerprint

DEVICES_VERSION = 1
DEVICE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


@dataclass(frozen=True)
class Device:
    """A paired agent."""

    name: str
    public_key: bytes   # 32-byte X25519 public key


class DeviceRegistry:
    """The trusted devices file, read fresh on every lookup.

    Reading on each handshake means ``tpmsigner allow`` takes effect for the
    next connection without restarting ``serve``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> list[Device]:
        if not self.path.exists():
            return []
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
            if record.get("version") != DEVICES_VERSION:
                raise ValueError(f"unsupported version {record.get('version')!r}")
            return [Device(name, parse_public_key(key)) for name, key in sorted(record["devices"].items())]
        except (OSError, ValueError, KeyError, AttributeError, TypeError, ConfigError) as exc:
            raise ConfigError(f"cannot read the trusted devices file {self.path}: {exc}") from None

    def find(self, public_key: bytes) -> Device | None:
        for device in self.load():
            if device.public_key == public_key:
                return device
        return None

    def allow(self, name: str, public_key: bytes, replace: bool = False) -> Device:
        """Trust ``public_key`` as ``name``.

        Another key already allowed under ``name`` is replaced only when
        ``replace`` is true, so a mistyped name cannot silently unpair a device.
        """
        if not DEVICE_NAME_PATTERN.fullmatch(name):
            raise ConfigError(
                f"invalid device name {name!r}: use 1 to 64 letters, digits or . _ @ + -, "
                "starting with a letter or digit"
            )
        devices = {device.name: device.public_key for device in self.load()}
        for other_name, other_key in devices.items():
            if other_key == public_key and other_name != name:
                raise ConfigError(f"that key is already allowed as device {other_name!r}")
        previous = devices.get(name)
        if previous is not None and previous != public_key and not replace:
            raise ConfigError(
                f"device {name!r} is already allowed with key {public_key_fingerprint(previous)}; "
                "to replace that key, run the command again with --replace"
            )
        devices[name] = public_key
        self._save(devices)
        return Device(name, public_key)

    def _save(self, devices: dict[str, bytes]) -> None:
        ensure_private_dir(self.path.parent)
        record = {
            "version": DEVICES_VERSION,
            "devices": {name: format_public_key(key) for name, key in sorted(devices.items())},
        }
        write_private_file(self.path, (json.dumps(record, indent=2) + "\n").encode("utf-8"))
