"""The key store: TSS2 key files and their metadata under a home directory.

Layout of ``HOME/keys/``, one pair of files per identity:

- ``LABEL.tss``: the TPM-wrapped key, in the TSS2 PRIVATE KEY PEM format;
- ``LABEL.json``: label, key type, public key, fingerprint, creation time,
  whether the identity is enabled, and the identity's OpenSSH certificate
  if it has one.

Nothing here talks to the TPM, so listing identities works without one.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

from .errors import (
    CertificateError,
    IdentityExistsError,
    IdentityNotFoundError,
    KeyFileError,
    KeyStoreError,
    ProtocolError,
    TpmBindingError,
)
from .fsutil import ensure_private_dir, fsync_directory, write_private_file
from .jsonutil import parse_json
from .keyfile import decode_key_file, encode_key_file
from .protocol.certificates import Certificate, decode_certificate
from .protocol.sshkeys import EcdsaPublicKey, SshPublicKey, fingerprint_of_blob, public_key_from_blob
from .tpm import TpmKeyBlob, describe_parent, public_key_of

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


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
    last_used: str | None = None    # ISO 8601, UTC, of the last signature
    description: str | None = None  # from an imported key file, if it had one
    # SHA256 fingerprints of the only server host keys this identity may log
    # in to; empty means no restriction.
    allowed_host_keys: tuple[str, ...] = ()
    # An OpenSSH user certificate of this identity's key, as a blob.
    certificate_blob: bytes | None = None

    @property
    def public_key(self) -> SshPublicKey:
        return public_key_from_blob(self.public_key_blob)

    @cached_property
    def certificate(self) -> Certificate | None:
        """The parsed certificate, if the identity has one."""
        if self.certificate_blob is None:
            return None
        return decode_certificate(self.certificate_blob)

    def agent_key_blobs(self) -> tuple[bytes, ...]:
        """Return the blobs an agent lists for this identity: the key, then its certificate.

        OpenSSH's ssh-agent lists a key and its certificate as two entries,
        in the order ssh-add adds them: the key first.
        """
        if self.certificate_blob is None:
            return (self.public_key_blob,)
        return (self.public_key_blob, self.certificate_blob)

    def openssh_line(self) -> str:
        """Return the public key as an ``authorized_keys`` line, with the label as comment."""
        return self.public_key.openssh_line(self.label)

    def to_json(self) -> dict[str, object]:
        record = asdict(self)
        record["public_key_blob"] = base64.b64encode(self.public_key_blob).decode("ascii")
        record["allowed_host_keys"] = list(self.allowed_host_keys)
        record["certificate_blob"] = (
            None if self.certificate_blob is None else base64.b64encode(self.certificate_blob).decode("ascii")
        )
        record["version"] = METADATA_VERSION
        return record

    @classmethod
    def from_json(cls, record: object, source: str) -> "Identity":
        if not isinstance(record, dict) or record.get("version") != METADATA_VERSION:
            raise KeyFileError(f"{source}: not a version {METADATA_VERSION} metadata record")
        try:
            identity = cls(
                label=_field(record, "label", str),
                key_type=_field(record, "key_type", str),
                public_key_blob=base64.b64decode(_field(record, "public_key_blob", str), validate=True),
                fingerprint=_field(record, "fingerprint", str),
                created=_field(record, "created", str),
                enabled=_field(record, "enabled", bool),
                last_used=_field(record, "last_used", str, optional=True),
                description=_field(record, "description", str, optional=True),
                allowed_host_keys=tuple(_field(record, "allowed_host_keys", list, optional=True) or ()),
                certificate_blob=_optional_base64(record, "certificate_blob"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise KeyFileError(f"{source}: missing or invalid field: {exc}") from None

        if not all(isinstance(item, str) and item.startswith("SHA256:") for item in identity.allowed_host_keys):
            raise KeyFileError(f"{source}: allowed_host_keys must be a list of SHA256: fingerprints")
        if fingerprint_of_blob(identity.public_key_blob) != identity.fingerprint:
            raise KeyFileError(f"{source}: the fingerprint does not match the public key")
        if identity.certificate_blob is not None:
            try:
                certificate = identity.certificate
            except CertificateError as exc:
                raise KeyFileError(f"{source}: invalid certificate: {exc}") from None
            assert certificate is not None
            if certificate.key_blob != identity.public_key_blob:
                raise KeyFileError(f"{source}: the certificate is for another key than the identity's")
        try:
            public_key_from_blob(identity.public_key_blob)
        except ProtocolError as exc:
            raise KeyFileError(f"{source}: public_key_blob is not a supported SSH public key: {exc}") from None
        return identity

    def to_display(self) -> dict[str, object]:
        """Return the fields ``show --json`` and ``list --json`` print."""
        return {
            "label": self.label,
            "key_type": self.key_type,
            "public_key": self.openssh_line(),
            "fingerprint": self.fingerprint,
            "created": self.created,
            "enabled": self.enabled,
            "last_used": self.last_used,
            "description": self.description,
            "allowed_host_keys": list(self.allowed_host_keys),
            "certificate": (
                self.certificate.to_display(time.time(), self.label) if self.certificate is not None else None
            ),
        }


def _optional_base64(record: dict, name: str) -> bytes | None:
    text = _field(record, name, str, optional=True)
    return None if text is None else base64.b64decode(text, validate=True)


def _field(record: dict, name: str, kind: type, optional: bool = False):
    """Return ``record[name]`` if it has type ``kind`` (or is absent and optional)."""
    if name not in record or record[name] is None:
        if optional:
            return None
        raise KeyError(name)
    value = record[name]
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be {kind.__name__}, not {type(value).__name__}")
    return value


class KeyStore:
    """Identities stored under ``home/keys``."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.keys_dir = self.home / "keys"
        # Parsed metadata by file name, with the (inode, size, mtime) it was
        # parsed from.  Every write replaces the file by rename, so a new
        # inode, and any change by hand alters size or mtime.
        self._metadata_cache: dict[str, tuple[tuple[int, int, int], Identity]] = {}
        # Label by public key blob, from the last full listing, so that a
        # sign request checks one metadata file rather than all of them.
        self._labels_by_blob: dict[bytes, str] = {}
        # Decoded key files by label, with the (inode, size, mtime) they were
        # decoded from, checked like the metadata cache.
        self._key_cache: dict[str, tuple[tuple[int, int, int], TpmKeyBlob]] = {}

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
        entries = sorted(
            (entry for entry in os.scandir(self.keys_dir) if entry.name.endswith(METADATA_SUFFIX)),
            key=lambda entry: entry.name,
        )
        identities = []
        cache = {}
        labels: dict[bytes, str] = {}
        for entry in entries:
            info = entry.stat()
            version = (info.st_ino, info.st_size, info.st_mtime_ns)
            cached = self._metadata_cache.get(entry.name)
            identity = cached[1] if cached and cached[0] == version else self._read_metadata(Path(entry.path))
            cache[entry.name] = (version, identity)
            identities.append(identity)
            for blob in identity.agent_key_blobs():
                labels.setdefault(blob, identity.label)
        self._metadata_cache = cache
        self._labels_by_blob = labels
        return identities

    def get(self, label: str) -> Identity:
        _, metadata_path = self._paths(label)
        if not metadata_path.exists():
            raise IdentityNotFoundError(f"no identity labelled {label!r} in {self.keys_dir}")
        return self._read_metadata(metadata_path)

    def find_by_public_key(self, blob: bytes) -> Identity:
        """Return the identity whose key blob, or whose certificate blob, is ``blob``.

        The identity found at the last listing is checked against its
        metadata file as it is now (one stat, and a read if it changed);
        only when that fails are all files listed again.
        """
        label = self._labels_by_blob.get(blob)
        if label is not None:
            identity = self._current_metadata(label)
            if identity is not None and blob in identity.agent_key_blobs():
                return identity
        for identity in self.list():
            if blob in identity.agent_key_blobs():
                return identity
        raise IdentityNotFoundError("no identity has the requested public key")

    def _current_metadata(self, label: str) -> Identity | None:
        """Return the identity in ``label``'s metadata file now, from the cache if the file is unchanged."""
        name = label + METADATA_SUFFIX
        path = self.keys_dir / name
        try:
            info = path.stat()
        except FileNotFoundError:
            return None
        version = (info.st_ino, info.st_size, info.st_mtime_ns)
        cached = self._metadata_cache.get(name)
        if cached and cached[0] == version:
            return cached[1]
        identity = self._read_metadata(path)
        self._metadata_cache[name] = (version, identity)
        return identity

    def key_blob(self, identity: Identity) -> TpmKeyBlob:
        """Read the wrapped key of ``identity`` and check it matches its metadata."""
        key_path, _ = self._paths(identity.label)
        try:
            info = key_path.stat()
        except FileNotFoundError:
            raise IdentityNotFoundError(f"key file {key_path} is missing") from None
        version = (info.st_ino, info.st_size, info.st_mtime_ns)
        cached = self._key_cache.get(identity.label)
        if cached and cached[0] == version:
            blob = cached[1]
        else:
            try:
                pem = key_path.read_bytes()
            except FileNotFoundError:
                raise IdentityNotFoundError(f"key file {key_path} is missing") from None
            blob = decode_key_file(pem, source=str(key_path))
            self._key_cache[identity.label] = (version, blob)
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

    def add(self, label: str, blob: TpmKeyBlob, description: str | None = None) -> Identity:
        """Store a new identity; the key file is written before its metadata.

        If the metadata cannot be written (a full disk, say), the key file
        is removed again, so a failed add leaves no half identity behind.
        """
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
            created=utc_now(),
            description=description,
        )
        write_private_file(key_path, encode_key_file(blob))
        try:
            self._write_metadata(identity)
        except BaseException:
            key_path.unlink(missing_ok=True)
            raise
        return identity

    def set_enabled(self, label: str, enabled: bool) -> Identity:
        identity = replace(self.get(label), enabled=enabled)
        self._write_metadata(identity)
        return identity

    def set_allowed_host_keys(self, label: str, fingerprints: tuple[str, ...]) -> Identity:
        """Restrict ``label`` to logins to these host keys; an empty tuple lifts the restriction."""
        identity = replace(self.get(label), allowed_host_keys=tuple(fingerprints))
        self._write_metadata(identity)
        return identity

    def set_certificate(self, label: str, certificate: Certificate | None) -> Identity:
        """Store ``certificate`` with identity ``label``, replacing any earlier one; None removes it.

        The certificate must certify the identity's key: ValueError otherwise.
        """
        identity = self.get(label)
        if certificate is not None and certificate.key_blob != identity.public_key_blob:
            raise ValueError(f"the certificate is for another key than identity {label!r}")
        blob = None if certificate is None else certificate.blob
        updated = replace(identity, certificate_blob=blob)
        self._write_metadata(updated)
        return updated

    def record_use(self, identity: Identity) -> Identity:
        """Set ``last_used`` to now, keeping every other field as stored."""
        updated = replace(self.get(identity.label), last_used=utc_now())
        self._write_metadata(updated)
        return updated

    def replace_key(self, identity: Identity, blob: TpmKeyBlob) -> None:
        """Replace the key file of ``identity`` with a blob of the same public key.

        Used after a PIN change: TPM2_ObjectChangeAuth returns a new private
        part for the same key.
        """
        if public_key_of(blob).blob != identity.public_key_blob:
            raise KeyFileError(f"the new key file of {identity.label!r} has another public key; not written")
        key_path, _ = self._paths(identity.label)
        write_private_file(key_path, encode_key_file(blob))

    def rename(self, label: str, new_label: str, *, enabled: bool | None = None) -> Identity:
        """Move identity ``label`` to ``new_label``; both files go, or neither.

        The new pair is written first and the old pair removed after, so a
        crash in between leaves two copies rather than none.
        """
        identity = self.get(label)
        blob = self.key_blob(identity)
        self.ensure_label_free(new_label)
        renamed = replace(identity, label=new_label, enabled=identity.enabled if enabled is None else enabled)
        new_key_path, _ = self._paths(new_label)
        write_private_file(new_key_path, encode_key_file(blob))
        try:
            self._write_metadata(renamed)
        except BaseException:
            new_key_path.unlink(missing_ok=True)
            raise
        self.delete(label)
        return renamed

    def delete(self, label: str) -> None:
        """Remove both files of identity ``label``; metadata first, so it stops being listed."""
        key_path, metadata_path = self._paths(label)
        if not metadata_path.exists() and not key_path.exists():
            raise IdentityNotFoundError(f"no identity labelled {label!r} in {self.keys_dir}")
        for path in (metadata_path, key_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        fsync_directory(self.keys_dir)

    def _write_metadata(self, identity: Identity) -> None:
        _, metadata_path = self._paths(identity.label)
        text = json.dumps(identity.to_json(), indent=2, sort_keys=True) + "\n"
        write_private_file(metadata_path, text.encode("utf-8"))

    def _read_metadata(self, path: Path) -> Identity:
        # Every listing stops at a damaged file rather than hide an identity,
        # so each error names the way to get the others back.
        hint = (
            f"; restore the file from a backup, or move it and its {KEY_FILE_SUFFIX} key file out of "
            f"{self.keys_dir} to use the other identities"
        )
        try:
            record = parse_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise KeyStoreError(f"cannot read identity metadata {path}: {exc}{hint}") from None
        try:
            identity = Identity.from_json(record, source=str(path))
        except KeyFileError as exc:
            raise KeyFileError(f"{exc}{hint}") from None
        if path.name != identity.label + METADATA_SUFFIX:
            raise KeyFileError(f"{path}: label {identity.label!r} does not match the file name{hint}")
        return identity


_PARENT_HANDLE = re.compile(r"0x[0-9a-f]{8}")


class TpmBinding:
    """The TPM names of the storage parents, recorded at first use (``HOME/tpm.json``).

    The salted session encrypts its salt to the storage key, and every key
    file is wrapped by it.  A different name on a later start means another
    TPM, a cleared TPM, or something between this host and the TPM that
    replies in its place, so the signer must not send it anything secret.
    """

    def __init__(self, home: Path) -> None:
        self.path = Path(home) / "tpm.json"

    def _load(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        try:
            record = parse_json(self.path.read_text(encoding="utf-8"))
            parents = record["parents"]
            if record.get("version") != 1 or not isinstance(parents, dict):
                raise ValueError("unsupported format")
            for handle, name in parents.items():
                # Callers parse the handles with int(handle, 16).
                if not _PARENT_HANDLE.fullmatch(handle):
                    raise ValueError(f"invalid parent handle {handle!r}, expected 0x and 8 hex digits")
                if not isinstance(name, str):
                    raise ValueError("every parent name must be a hex string")
            return dict(parents)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyStoreError(f"cannot read the TPM binding file {self.path}: {exc}") from None

    def recorded(self) -> dict[str, str]:
        """Return the recorded parent names, by handle as ``0x%08x``."""
        return self._load()

    def check(self, parent: int, name: bytes) -> None:
        """Record ``name`` for ``parent`` on first use, or raise TpmBindingError if it changed."""
        handle = f"0x{parent:08x}"
        parents = self._load()
        recorded = parents.get(handle)
        if recorded is None:
            parents[handle] = name.hex()
            ensure_private_dir(self.path.parent)
            text = json.dumps({"version": 1, "parents": parents}, indent=2, sort_keys=True) + "\n"
            write_private_file(self.path, text.encode("utf-8"))
            return
        if recorded != name.hex():
            raise TpmBindingError(
                f"the TPM's storage key ({describe_parent(parent)}) has name {name.hex()[:24]}..., not the "
                f"{recorded[:24]}... recorded in {self.path} when these identities were made. "
                "This is another TPM, the TPM was cleared, or something between this host and "
                "the TPM is answering in its place; refusing to use it. If the TPM was "
                "deliberately replaced or cleared, the old keys are lost: move this home away "
                "and create new keys"
            )
