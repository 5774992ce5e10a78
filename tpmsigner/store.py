"""The key store: TSS2 key files and their metadata under a home directory.

Layout of ``HOME/keys/``, one pair of files per identity:

- ``LABEL.tss``: the TPM-wrapped key, in the TSS2 PRIVATE KEY PEM format;
- ``LABEL.json``: label, key type, public key, fingerprint, creation time
  and whether the identity is enabled.

Nothing here talks to the TPM, so listing identities works without one.
"""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from .errors import IdentityExistsError, IdentityNotFoundError, KeyFileError, KeyStoreError
from .fsutil import ensure_private_dir, write_private_file
from .keyfile import decode_key_file, encode_key_file
from .protocol.sshkeys import EcdsaPublicKey, SshPublicKey, public_key_from_blob
from .tpm import TpmKeyBlob, public_key_of

METADATA_VERSION = 1
LABEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
KEY_FILE_SUFFIX = ".tss"
METADATA_SUFFIX = ".json"


def validate_label(label: str) -> str:
    """Return ``label`` if it is a valid identity label, else raise ValueError."""
    if not LABEL_PATTERN.fullmatch(label):
        raise ValueError(
            f"invalid label {label!r}: use 1 to 64 letters, digits or . _ @ + -, "
            "starting with a letter or digit"
        )
    return label


def key_type_name(public_key: SshPublicKey) -> str:
    """Return the name ``keygen --type`` uses for a key like ``public_key``."""
    if isinstance(public_key, EcdsaPublicKey):
        return "ecdsa-" + public_key.curve.ssh_name.replace("nist", "")
    return f"rsa-{public_key.bits}"


def default_home() -> Path:
    """Return ``$TPMSIGNER_HOME``, else ``$XDG_DATA_HOME/tpmsigner``."""
    if os.environ.get("TPMSIGNER_HOME"):
        return Path(os.environ["TPMSIGNER_HOME"])
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data_home) / "tpmsigner"


@dataclass(frozen=True)
class Identity:
    """One TPM-held key and what the store records about it."""

    label: str
    key_type: str         # "ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", ...
    public_key_blob: bytes
    fingerprint: str
    created: str          # ISO 8601, UTC
    enabled: bool = True

    @property
    def public_key(self) -> SshPublicKey:
        return public_key_from_blob(self.public_key_blob)

    def openssh_line(self) -> str:
        """The public key as an ``authorized_keys`` line, with the label as comment."""
        return self.public_key.openssh_line(self.label)

    def to_json(self) -> dict[str, object]:
        record = asdict(self)
        record["public_key_blob"] = base64.b64encode(self.public_key_blob).decode("ascii")
        record["version"] = METADATA_VERSION
        return record

    @classmethod
    def from_json(cls, record: object, source: str) -> "Identity":
        if not isinstance(record, dict) or record.get("version") != METADATA_VERSION:
            raise KeyFileError(f"{source}: not a version {METADATA_VERSION} metadata record")
        try:
            identity = cls(
                label=str(record["label"]),
                key_type=str(record["key_type"]),
                public_key_blob=base64.b64decode(record["public_key_blob"], validate=True),
                fingerprint=str(record["fingerprint"]),
                created=str(record["created"]),
                enabled=bool(record["enabled"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise KeyFileError(f"{source}: missing or invalid field: {exc}") from None
        return identity


class KeyStore:
    """Identities stored under ``home/keys``."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.keys_dir = self.home / "keys"

    def _paths(self, label: str) -> tuple[Path, Path]:
        validate_label(label)
        return self.keys_dir / (label + KEY_FILE_SUFFIX), self.keys_dir / (label + METADATA_SUFFIX)

    def list(self) -> list[Identity]:
        """Return every identity, sorted by label.

        A metadata file that cannot be read raises KeyFileError naming it,
        rather than silently hiding an identity from the person.
        """
        if not self.keys_dir.is_dir():
            return []
        identities = []
        for path in sorted(self.keys_dir.glob("*" + METADATA_SUFFIX)):
            identities.append(self._read_metadata(path))
        return identities

    def get(self, label: str) -> Identity:
        _, metadata_path = self._paths(label)
        if not metadata_path.exists():
            raise IdentityNotFoundError(f"no identity labelled {label!r} in {self.keys_dir}")
        return self._read_metadata(metadata_path)

    def find_by_public_key(self, blob: bytes) -> Identity:
        for identity in self.list():
            if identity.public_key_blob == blob:
                return identity
        raise IdentityNotFoundError("no identity has the requested public key")

    def key_blob(self, identity: Identity) -> TpmKeyBlob:
        """Read the wrapped key of ``identity`` and check it matches its metadata."""
        key_path, _ = self._paths(identity.label)
        try:
            pem = key_path.read_bytes()
        except FileNotFoundError:
            raise IdentityNotFoundError(f"key file {key_path} is missing") from None
        blob = decode_key_file(pem, source=str(key_path))
        if public_key_of(blob).blob != identity.public_key_blob:
            raise KeyFileError(
                f"key file {key_path} contains a different public key than its metadata records; "
                "restore the pair of files from the same backup"
            )
        return blob

    def ensure_label_free(self, label: str) -> None:
        """Raise IdentityExistsError if ``label`` is taken."""
        key_path, metadata_path = self._paths(label)
        if metadata_path.exists() or key_path.exists():
            raise IdentityExistsError(f"an identity labelled {label!r} already exists in {self.keys_dir}")

    def add(self, label: str, blob: TpmKeyBlob) -> Identity:
        """Store a new identity; the key file is written before its metadata."""
        key_path, _ = self._paths(label)
        ensure_private_dir(self.home)
        ensure_private_dir(self.keys_dir)
        self.ensure_label_free(label)

        public_key = public_key_of(blob)
        identity = Identity(
            label=label,
            key_type=key_type_name(public_key),
            public_key_blob=public_key.blob,
            fingerprint=public_key.fingerprint,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        write_private_file(key_path, encode_key_file(blob))
        self._write_metadata(identity)
        return identity

    def set_enabled(self, label: str, enabled: bool) -> Identity:
        identity = replace(self.get(label), enabled=enabled)
        self._write_metadata(identity)
        return identity

    def _write_metadata(self, identity: Identity) -> None:
        _, metadata_path = self._paths(identity.label)
        text = json.dumps(identity.to_json(), indent=2, sort_keys=True) + "\n"
        write_private_file(metadata_path, text.encode("utf-8"))

    def _read_metadata(self, path: Path) -> Identity:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise KeyStoreError(f"cannot read identity metadata {path}: {exc}") from None
        identity = Identity.from_json(record, source=str(path))
        if path.name != identity.label + METADATA_SUFFIX:
            raise KeyFileError(f"{path}: label {identity.label!r} does not match the file name")
        return identity
