"""The bounded set of signing keys that stay loaded in the TPM."""

from __future__ import annotations

import pytest

from tpmsigner.loadedkeys import LoadedKeys, loaded_key_capacity


def test_least_recently_used_key_is_evicted_for_flushing() -> None:
    keys: LoadedKeys[str] = LoadedKeys(2)
    assert keys.put(1, b"pub-a", b"priv-a", "a") == []
    assert keys.put(1, b"pub-b", b"priv-b", "b") == []
    assert keys.get(1, b"pub-a", b"priv-a") == "a"   # a is now the most recent

    assert keys.put(1, b"pub-c", b"priv-c", "c") == ["b"]
    assert keys.get(1, b"pub-b", b"priv-b") is None
    assert len(keys) == 2


def test_a_key_is_found_only_under_its_exact_blob() -> None:
    keys: LoadedKeys[str] = LoadedKeys(4)
    keys.put(0x40000001, b"pub", b"priv-old", "old")
    # After a PIN change the private part differs, so the old load does not match.
    assert keys.get(0x40000001, b"pub", b"priv-new") is None
    assert keys.get(0x81000001, b"pub", b"priv-old") is None
    assert keys.discard_public(b"pub") == ["old"]
    assert len(keys) == 0


def test_capacity_zero_hands_every_handle_back() -> None:
    keys: LoadedKeys[str] = LoadedKeys(0)
    assert keys.put(1, b"pub", b"priv", "h") == ["h"]
    assert keys.clear() == []


def test_negative_capacity_is_rejected() -> None:
    with pytest.raises(ValueError, match="0 or more"):
        LoadedKeys(-1)


@pytest.mark.parametrize(
    ("tcti", "capacity"),
    [("swtpm:host=127.0.0.1,port=2321", 1), ("mssim:host=localhost", 1), ("device:/dev/tpmrm0", 4), ("tabrmd:bus_type=session", 4)],
)
def test_capacity_depends_on_a_resource_manager(tcti: str, capacity: int) -> None:
    assert loaded_key_capacity(tcti) == capacity
