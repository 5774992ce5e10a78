"""Finding an identity by its public key checks the metadata file as it is now."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tpmsigner.errors import IdentityNotFoundError
from tpmsigner.protocol.sshkeys import NISTP256, EcdsaPublicKey
from tpmsigner.store import Identity, KeyStore


def write_identity(home: Path, label: str, enabled: bool = True) -> Identity:
    numbers = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    public_key = EcdsaPublicKey(NISTP256, numbers.x, numbers.y)
    identity = Identity(
        label=label,
        key_type="ecdsa-p256",
        public_key_blob=public_key.blob,
        fingerprint=public_key.fingerprint,
        created="2026-12-04T10:00:00+00:00",
        enabled=enabled,
    )
    rewrite(home, identity)
    return identity


def rewrite(home: Path, identity: Identity) -> None:
    """Replace the metadata file atomically, as every tpmsigner command does."""
    keys = home / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    temporary = keys / f".{identity.label}.tmp"
    temporary.write_text(json.dumps(identity.to_json()))
    os.replace(temporary, keys / f"{identity.label}.json")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def test_lookup_sees_atomic_rewrite(home: Path) -> None:
    work = write_identity(home, "work")
    store = KeyStore(home)
    assert store.find_by_public_key(work.public_key_blob) == work

    rewrite(home, replace(work, enabled=False, allowed_host_keys=("SHA256:abc",)))

    found = store.find_by_public_key(work.public_key_blob)
    assert found.enabled is False
    assert found.allowed_host_keys == ("SHA256:abc",)


def test_lookup_sees_edit_in_place(home: Path) -> None:
    work = write_identity(home, "work")
    store = KeyStore(home)
    store.find_by_public_key(work.public_key_blob)

    # Same inode: an editor writing the file in place.
    path = home / "keys" / "work.json"
    record = json.loads(path.read_text())
    record["enabled"] = False
    path.write_text(json.dumps(record) + "\n")

    assert store.find_by_public_key(work.public_key_blob).enabled is False


def test_lookup_misses_deleted_identity(home: Path) -> None:
    work = write_identity(home, "work")
    store = KeyStore(home)
    store.find_by_public_key(work.public_key_blob)

    (home / "keys" / "work.json").unlink()

    with pytest.raises(IdentityNotFoundError):
        store.find_by_public_key(work.public_key_blob)


def test_lookup_finds_identity_added_later(home: Path) -> None:
    work = write_identity(home, "work")
    store = KeyStore(home)
    store.find_by_public_key(work.public_key_blob)

    later = write_identity(home, "later")

    assert store.find_by_public_key(later.public_key_blob) == later


def test_lookup_rejects_label_with_new_key(home: Path) -> None:
    work = write_identity(home, "work")
    store = KeyStore(home)
    store.find_by_public_key(work.public_key_blob)

    write_identity(home, "work")   # same label, new key

    with pytest.raises(IdentityNotFoundError):
        store.find_by_public_key(work.public_key_blob)
