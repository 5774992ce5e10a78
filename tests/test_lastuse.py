"""The signer writes an identity's last use at most once a minute."""

from __future__ import annotations

from pathlib import Path

import pytest

import tpmsigner
from tpmsigner.errors import IdentityNotFoundError
from tpmsigner.signer.lastuse import LastUseRecorder
from tpmsigner.store import KeyStore

PIN = b"4711-last-use"


@pytest.fixture
def store_with_identity(swtpm, tmp_path: Path) -> tuple[KeyStore, tpmsigner.Identity]:
    store = KeyStore(tmp_path / "home")
    with tpmsigner.Tpm(swtpm.tcti) as tpm:
        identity = tpmsigner.create_identity(tpm, store, "work", PIN)
    return store, identity


def test_use_within_interval_not_written(store_with_identity) -> None:
    store, identity = store_with_identity
    now = [1000.0]
    recorder = LastUseRecorder(store, interval=60.0, clock=lambda: now[0])

    assert recorder.record(identity) is True
    first = store.get("work").last_used
    assert first is not None

    now[0] += 59.0
    metadata = store.keys_dir / "work.json"
    before = metadata.stat().st_ino
    assert recorder.record(identity) is False
    assert metadata.stat().st_ino == before   # not rewritten

    now[0] += 2.0
    assert recorder.record(identity) is True
    assert metadata.stat().st_ino != before


def test_failed_write_retried_next_use(store_with_identity) -> None:
    store, identity = store_with_identity
    recorder = LastUseRecorder(store, interval=60.0, clock=lambda: 5.0)
    metadata = store.keys_dir / "work.json"
    aside = metadata.with_name("work.json.aside")
    metadata.rename(aside)

    with pytest.raises(IdentityNotFoundError):
        recorder.record(identity)

    aside.rename(metadata)
    assert recorder.record(identity) is True
    assert store.get("work").last_used is not None
