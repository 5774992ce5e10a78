"""Agents the signer trusts, by device name and Noise static key.

Stored as ``HOME/devices.json``: ``{"version": 2, "devices": {NAME: {"key":
KEY, "paired": TIME, "last_seen": TIME, "last_address": "HOST:PORT"}}}``
with KEY in the text form that ``tpmsigner-agent id`` prints and TIME in
ISO 8601 UTC.  Only ``key`` is required.  Version 1 files, ``{"version": 1,
"devices": {NAME: KEY}}``, are still read, and the next change writes them
as version 2.

Every change re-reads the file under an exclusive lock on
``devices.json.lock``, so a last-seen update from ``serve`` cannot undo a
concurrent ``revoke`` or ``allow``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace as replace_field
from pathlib import Path

from ..errors import ConfigError
from ..fsutil import ensure_private_dir, write_private_file
from ..jsonutil import parse_json
from ..protocol.channel import format_public_key, parse_public_key, public_key_fingerprint

DEVICES_VERSION = 2
READABLE_VERSIONS = (1, 2)
DEVICE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


@dataclass(frozen=True)
class Device:
    """A paired agent."""

    name: str
    public_key: bytes   # 32-byte X25519 public key
    paired: str | None = None         # ISO 8601 UTC, None for devices allowed before version 2
    last_seen: str | None = None      # ISO 8601 UTC; serve updates it at most once a minute
    last_address: str | None = None   # HOST:PORT of that connection


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class DeviceRegistry:
    """The trusted devices file, read fresh on every lookup.

    Reading on each handshake means ``tpmsigner allow`` takes effect for the
    next connection without restarting ``serve``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> list[Device]:
        """Return the trusted devices; raise ConfigError, naming the file and the fix, if it is invalid."""
        if not self.path.exists():
            return []
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise self._invalid(exc.strerror or str(exc)) from None
        except UnicodeDecodeError:
            raise self._invalid("the file is not UTF-8 text") from None
        try:
            record = parse_json(text)
        except ValueError as exc:
            raise self._invalid(f"not valid JSON ({exc})") from None
        try:
            return _parse_devices(record)
        except (ValueError, ConfigError) as exc:
            raise self._invalid(str(exc)) from None

    def _invalid(self, reason: str) -> ConfigError:
        return ConfigError(
            f"cannot read the trusted devices file {self.path}: {reason}; correct the file, or move it away "
            "and pair the agents again with 'tpmsigner pair' or 'tpmsigner allow'"
        )

    def find(self, public_key: bytes) -> Device | None:
        for device in self.load():
            if device.public_key == public_key:
                return device
        return None

    def check_allow(self, name: str, public_key: bytes, replace: bool = False) -> None:
        """Raise ConfigError if ``allow(name, public_key, replace)`` would be rejected."""
        if not DEVICE_NAME_PATTERN.fullmatch(name):
            raise ConfigError(
                f"invalid device name {name!r}: use 1 to 64 letters, digits or . _ @ + -, "
                "starting with a letter or digit"
            )
        for device in self.load():
            if device.public_key == public_key and device.name != name:
                raise ConfigError(f"that key is already allowed as device {device.name!r}")
            if device.name == name and device.public_key != public_key and not replace:
                raise ConfigError(
                    f"device {name!r} is already allowed with key {public_key_fingerprint(device.public_key)}; "
                    "to replace that key, run the command again with --replace, or revoke the device first"
                )

    def allow(self, name: str, public_key: bytes, replace: bool = False) -> Device:
        """Trust ``public_key`` as ``name``.

        Another key already allowed under ``name`` is replaced only when
        ``replace`` is true, so a mistyped name cannot silently unpair a device.
        """
        with self._locked():
            self.check_allow(name, public_key, replace)
            devices = {device.name: device for device in self.load()}
            previous = devices.get(name)
            if previous is not None and previous.public_key == public_key:
                device = previous if previous.paired else replace_field(previous, paired=utc_now())
            else:
                device = Device(name, public_key, paired=utc_now())
            devices[name] = device
            self._save(devices)
        return device

    def revoke(self, name: str) -> Device:
        """Remove device ``name``; raise ConfigError if there is none."""
        with self._locked():
            devices = {device.name: device for device in self.load()}
            device = devices.pop(name, None)
            if device is None:
                known = ", ".join(sorted(devices)) or "none"
                raise ConfigError(f"no device named {name!r} is allowed (allowed devices: {known})")
            self._save(devices)
        return device

    def record_seen(self, public_key: bytes, address: str) -> Device | None:
        """Store the current time and ``address`` as the last contact of the device with ``public_key``.

        Returns the updated device, or None when the key is no longer
        allowed; a revoked device is never written back.
        """
        with self._locked():
            devices = {device.name: device for device in self.load()}
            current = next((device for device in devices.values() if device.public_key == public_key), None)
            if current is None:
                return None
            updated = replace_field(current, last_seen=utc_now(), last_address=address)
            devices[current.name] = updated
            self._save(devices)
        return updated

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        ensure_private_dir(self.path.parent)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _save(self, devices: dict[str, Device]) -> None:
        ensure_private_dir(self.path.parent)
        record = {
            "version": DEVICES_VERSION,
            "devices": {name: _format_entry(device) for name, device in sorted(devices.items())},
        }
        write_private_file(self.path, (json.dumps(record, indent=2) + "\n").encode("utf-8"))


def _parse_devices(record: object) -> list[Device]:
    """Return the devices of a parsed devices.json; raise ValueError or ConfigError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError("the file must contain a JSON object")
    version = record.get("version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"unsupported version {version!r}, expected one of {', '.join(map(str, READABLE_VERSIONS))}")
    devices = record.get("devices")
    if not isinstance(devices, dict):
        raise ValueError("'devices' must be a JSON object of device names")
    return [_parse_entry(name, entry, version) for name, entry in sorted(devices.items())]


def _parse_entry(name: str, entry: object, version: int) -> Device:
    if version == 1:
        if not isinstance(entry, str):
            raise ValueError(f"device {name!r}: expected a key string")
        return Device(name, parse_public_key(entry))
    if not isinstance(entry, dict):
        raise ValueError(f"device {name!r}: expected an object with a 'key'")
    if not isinstance(entry.get("key"), str):
        raise ValueError(f"device {name!r}: 'key' must be a string, as 'tpmsigner-agent id' prints it")
    optional = {}
    for field_name in ("paired", "last_seen", "last_address"):
        value = entry.get(field_name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"device {name!r}: {field_name} must be a string")
        optional[field_name] = value
    return Device(name, parse_public_key(entry["key"]), **optional)


def _format_entry(device: Device) -> dict[str, str]:
    entry = {"key": format_public_key(device.public_key)}
    for field_name in ("paired", "last_seen", "last_address"):
        value = getattr(device, field_name)
        if value is not None:
            entry[field_name] = value
    return entry
