"""The TPM layer and the library API against a real swtpm."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncssh
import pytest
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_CAP, TPM2_HT, TPM2_PT, TPMA_OBJECT
from tpm2_pytss.TCTILdr import TCTILdr
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE

import tpmsigner
from tpmsigner.errors import TpmAuthError, TpmKeyLoadError
from tpmsigner.keyfile import decode_key_file
from tpmsigner.signer.worker import TpmWorker
from tpmsigner.templates import SRK_PERSISTENT_HANDLE, srk_ecc_p256_template
from tpmsigner.tpm import PARENT_OWNER, Tpm
from tests.support import start_swtpm
from tests.test_tpm_tampering import loaded_handles

PIN = b"pin-Xq7-under-test"


@pytest.fixture
def store(tmp_path: Path) -> tpmsigner.KeyStore:
    return tpmsigner.KeyStore(tmp_path / "home")


def tpm_property(tcti: str, prop: int) -> int:
    esapi = ESAPI(TCTILdr.parse(tcti))
    try:
        _, data = esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, prop, 1)
        return int(data.data.tpmProperties[0].value)
    finally:
        esapi.close()


def loaded_handles(tcti: str) -> dict[str, list[int]]:
    esapi = ESAPI(TCTILdr.parse(tcti))
    try:
        handles = {}
        for name, handle_type in (("transient", TPM2_HT.TRANSIENT), ("sessions", TPM2_HT.LOADED_SESSION)):
            _, data = esapi.get_capability(TPM2_CAP.HANDLES, handle_type << 24, 64)
            handles[name] = list(data.data.handles)
        return handles
    finally:
        esapi.close()


def test_key_has_pin_and_lockout_attributes(swtpm, store) -> None:
    with Tpm(swtpm.tcti) as tpm:
        identity = tpmsigner.create_identity(tpm, store, "work", PIN)

    pem = (store.keys_dir / "work.tss").read_bytes()
    assert pem.startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    key = TSSPrivKey.from_pem(pem)
    attributes = int(key.public.publicArea.objectAttributes)
    for required in (
        TPMA_OBJECT.FIXEDTPM,
        TPMA_OBJECT.FIXEDPARENT,
        TPMA_OBJECT.SENSITIVEDATAORIGIN,
        TPMA_OBJECT.USERWITHAUTH,
        TPMA_OBJECT.SIGN_ENCRYPT,
    ):
        assert attributes & required, f"missing {required!s}"
    for forbidden in (TPMA_OBJECT.NODA, TPMA_OBJECT.DECRYPT, TPMA_OBJECT.RESTRICTED):
        assert not attributes & forbidden, f"unexpected {forbidden!s}"
    assert key.empty_auth is False
    assert key.parent == PARENT_OWNER
    assert identity.key_type == "ecdsa-p256"


def test_store_files_are_private(swtpm, store) -> None:
    with Tpm(swtpm.tcti) as tpm:
        tpmsigner.create_identity(tpm, store, "work", PIN)

    assert os.stat(store.home).st_mode & 0o777 == 0o700
    assert os.stat(store.keys_dir).st_mode & 0o777 == 0o700
    assert os.stat(store.keys_dir / "work.tss").st_mode & 0o777 == 0o600
    assert os.stat(store.keys_dir / "work.json").st_mode & 0o777 == 0o600
    assert sorted(path.name for path in store.keys_dir.iterdir()) == ["work.json", "work.tss"]


def test_signature_verifies_with_asyncssh(swtpm, store) -> None:
    with Tpm(swtpm.tcti) as tpm:
        identity = tpmsigner.create_identity(tpm, store, "work", PIN)
        signature = tpmsigner.sign_data(tpm, store, identity, b"payload", PIN)

    public_key = asyncssh.import_public_key(identity.openssh_line())
    assert public_key.verify(b"payload", signature)
    assert not public_key.verify(b"other payload", signature)


def test_wrong_pin_counts_toward_lockout(swtpm, store) -> None:
    with Tpm(swtpm.tcti) as tpm:
        identity = tpmsigner.create_identity(tpm, store, "work", PIN)
        before = tpm_property(swtpm.tcti, TPM2_PT.LOCKOUT_COUNTER)

        with pytest.raises(TpmAuthError) as raised:
            tpmsigner.sign_data(tpm, store, identity, b"payload", b"wrong-pin")

        after = tpm_property(swtpm.tcti, TPM2_PT.LOCKOUT_COUNTER)
        assert after == before + 1
        assert "wrong PIN" in str(raised.value)
        assert "wrong-pin" not in str(raised.value)

        # The session is rebuilt after the failure; the right PIN still works.
        signature = tpmsigner.sign_data(tpm, store, identity, b"payload", PIN)
    assert asyncssh.import_public_key(identity.openssh_line()).verify(b"payload", signature)


def test_empty_pin_is_rejected(swtpm, store) -> None:
    with Tpm(swtpm.tcti) as tpm:
        with pytest.raises(ValueError, match="the PIN is empty"):
            tpmsigner.create_identity(tpm, store, "work", b"")
    assert store.list() == []


def test_no_handles_left_after_close(swtpm, store) -> None:
    with Tpm(swtpm.tcti) as tpm:
        identity = tpmsigner.create_identity(tpm, store, "work", PIN)
        for _ in range(5):
            tpmsigner.sign_data(tpm, store, identity, b"payload", PIN)
        after_signing = loaded_handles(swtpm.tcti)
        with pytest.raises(TpmAuthError):
            tpmsigner.sign_data(tpm, store, identity, b"payload", b"wrong-pin")
        after_wrong_pin = loaded_handles(swtpm.tcti)

    # While open: the storage primary, the signing key kept loaded for the
    # next signature (once, however many signatures), and the HMAC session.
    assert len(after_signing["transient"]) == 2
    assert len(after_signing["sessions"]) == 1
    # A failed authorisation flushes the session; the next sign starts one.
    # The loaded key stays: without its PIN it is of no use to anyone.
    assert len(after_wrong_pin["transient"]) == 2
    assert after_wrong_pin["sessions"] == []
    assert loaded_handles(swtpm.tcti) == {"transient": [], "sessions": []}


@pytest.fixture(params=["direct", "pcap"])
def swtpm_tcti(request, swtpm, tmp_path, monkeypatch) -> str:
    """The swtpm's TCTI string, on its own or as the child of a pcap TCTI that records to tmp_path."""
    if request.param == "direct":
        return swtpm.tcti
    monkeypatch.setenv("TCTI_PCAP_FILE", str(tmp_path / "tpm.pcap"))
    return "pcap:" + swtpm.tcti


def test_loaded_keys_bounded_on_swtpm(swtpm, swtpm_tcti, store) -> None:
    with Tpm(swtpm_tcti) as tpm:
        identities = [tpmsigner.create_identity(tpm, store, label, PIN) for label in ("one", "two", "three")]
        for _ in range(2):
            for identity in identities:
                signature = tpmsigner.sign_data(tpm, store, identity, b"payload", PIN)
                assert asyncssh.import_public_key(identity.openssh_line()).verify(b"payload", signature)
                # swtpm has three object slots: the storage primary and one
                # signing key at most, so another program still has one.
                assert len(loaded_handles(swtpm.tcti)["transient"]) == 2
    assert loaded_handles(swtpm.tcti) == {"transient": [], "sessions": []}


def test_pin_change_unloads_old_key(swtpm, store) -> None:
    with Tpm(swtpm.tcti) as tpm:
        identity = tpmsigner.create_identity(tpm, store, "work", PIN)
        tpmsigner.sign_data(tpm, store, identity, b"payload", PIN)
        assert len(loaded_handles(swtpm.tcti)["transient"]) == 2

        new_blob = tpm.change_pin(store.key_blob(identity), PIN, b"new-pin-5678")
        store.replace_key(identity, new_blob)

        # The copy loaded with the old PIN is gone, so the old PIN works on
        # no loaded object any more; the new file signs with the new PIN.
        assert len(loaded_handles(swtpm.tcti)["transient"]) == 1
        signature = tpmsigner.sign_data(tpm, store, identity, b"payload", b"new-pin-5678")
        assert asyncssh.import_public_key(identity.openssh_line()).verify(b"payload", signature)
        with pytest.raises(TpmAuthError):
            tpmsigner.sign_data(tpm, store, identity, b"payload", PIN)


def test_stale_handles_are_flushed_by_owner(swtpm, swtpm_tcti, store) -> None:
    leaking = Tpm(swtpm.tcti)
    identity = tpmsigner.create_identity(leaking, store, "work", PIN)
    # Simulate a killed process: drop the context without flushing.
    leaking._esapi.close()  # noqa: SLF001 - the only way to leak handles on purpose
    leaking._esapi = None  # noqa: SLF001
    assert loaded_handles(swtpm.tcti)["transient"] != []

    with Tpm(swtpm_tcti, flush_stale_handles=True) as owner:
        signature = tpmsigner.sign_data(owner, store, identity, b"payload", PIN)
    assert asyncssh.import_public_key(identity.openssh_line()).verify(b"payload", signature)
    assert loaded_handles(swtpm.tcti) == {"transient": [], "sessions": []}


def test_pin_is_encrypted_on_the_tpm_interface(swtpm, store, tmp_path, monkeypatch) -> None:
    capture = tmp_path / "tpm.pcap"
    monkeypatch.setenv("TCTI_PCAP_FILE", str(capture))
    pin = b"Cleartext-Canary-PIN-93517"

    with Tpm("pcap:" + swtpm.tcti) as tpm:
        identity = tpmsigner.create_identity(tpm, store, "work", pin)
        tpmsigner.sign_data(tpm, store, identity, b"payload", pin)
    captured = capture.read_bytes()
    assert len(captured) > 1000
    assert pin not in captured

    # Control: the same capture does show a PIN sent in a password session,
    # so its absence above means encryption, not a blind capture.
    control_capture = tmp_path / "control.pcap"
    monkeypatch.setenv("TCTI_PCAP_FILE", str(control_capture))
    esapi = ESAPI(TCTILdr.parse("pcap:" + swtpm.tcti))
    try:
        TSSPrivKey.create_ecc(esapi, password=pin)
    finally:
        for handle in loaded_handles(swtpm.tcti)["transient"]:
            esapi.flush_context(esapi.tr_from_tpmpublic(handle))
        esapi.close()
    assert pin in control_capture.read_bytes()


def test_persistent_srk_becomes_the_parent(swtpm, store) -> None:
    esapi = ESAPI(TCTILdr.parse(swtpm.tcti))
    try:
        primary, _, _, _, _ = esapi.create_primary(
            TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=srk_ecc_p256_template()), ESYS_TR.RH_OWNER
        )
        esapi.evict_control(ESYS_TR.RH_OWNER, primary, SRK_PERSISTENT_HANDLE)
        esapi.flush_context(primary)
    finally:
        esapi.close()

    with Tpm(swtpm.tcti) as tpm:
        identity = tpmsigner.create_identity(tpm, store, "work", PIN)
        signature = tpmsigner.sign_data(tpm, store, identity, b"payload", PIN)

    blob = decode_key_file((store.keys_dir / "work.tss").read_bytes())
    assert blob.parent == SRK_PERSISTENT_HANDLE
    assert asyncssh.import_public_key(identity.openssh_line()).verify(b"payload", signature)
    assert loaded_handles(swtpm.tcti)["transient"] == []


def test_key_from_another_tpm_does_not_load(swtpm, store, tmp_path) -> None:
    with Tpm(swtpm.tcti) as tpm:
        identity = tpmsigner.create_identity(tpm, store, "work", PIN)
    files_before = {path.name: path.read_bytes() for path in store.keys_dir.iterdir()}

    other = start_swtpm(tmp_path / "other-swtpm")
    try:
        with Tpm(other.tcti) as other_tpm:
            with pytest.raises(TpmKeyLoadError) as raised:
                tpmsigner.sign_data(other_tpm, store, identity, b"payload", PIN)
    finally:
        other.stop()

    assert "another TPM" in str(raised.value)
    assert {path.name: path.read_bytes() for path in store.keys_dir.iterdir()} == files_before


def test_worker_flushes_idle_loaded_keys(swtpm, store) -> None:
    tpm = Tpm(swtpm.tcti)
    identity = tpmsigner.create_identity(tpm, store, "work", PIN)
    # The idle time is long enough that the count right after signing finds
    # the key even on a busy machine.  The wait for the flush polls, and its
    # bound only stops a worker that never flushes.
    worker = TpmWorker(tpm, key_idle=2.0)

    async def sign_then_wait() -> tuple[int, int]:
        await worker.call(tpmsigner.sign_data, tpm, store, identity, b"payload", PIN)
        right_after = len(loaded_handles(swtpm.tcti)["transient"])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while len(loaded_handles(swtpm.tcti)["transient"]) == right_after and loop.time() < deadline:
            await asyncio.sleep(0.1)
        return right_after, len(loaded_handles(swtpm.tcti)["transient"])

    try:
        right_after, idle = asyncio.run(asyncio.wait_for(sign_then_wait(), 30))
    finally:
        worker.close()

    # The storage primary and the signing key, then the primary alone.
    assert right_after == 2
    assert idle == 1
    assert loaded_handles(swtpm.tcti) == {"transient": [], "sessions": []}


def test_threads_share_one_tpm(swtpm, store) -> None:
    tpm = Tpm(swtpm.tcti)
    try:
        identities = [tpmsigner.create_identity(tpm, store, label, PIN) for label in ("one", "two")]
        tries_before = tpm.lockout_status().failed_tries

        def work(worker: int) -> list[bool]:
            verified = []
            for round_number in range(8):
                identity = identities[(worker + round_number) % len(identities)]
                data = b"thread %d round %d" % (worker, round_number)
                if worker == 0 and round_number == 3:
                    with pytest.raises(TpmAuthError):
                        tpmsigner.sign_data(tpm, store, identity, data, b"wrong-pin")
                elif round_number % 4 == 1:
                    tpm.check_ready(PARENT_OWNER)
                elif round_number % 4 == 2:
                    tpm.flush_loaded_keys()
                signature = tpmsigner.sign_data(tpm, store, identity, data, PIN)
                verified.append(asyncssh.import_public_key(identity.openssh_line()).verify(data, signature))
            return verified

        # Every call shares one TCTI, so a raw command of one thread sent
        # between another thread's command and response would fail that call.
        with ThreadPoolExecutor(max_workers=6) as pool:
            results = list(pool.map(work, range(6)))

        assert results == [[True] * 8] * 6
        assert tpm.lockout_status().failed_tries == tries_before + 1
    finally:
        tpm.close()
    assert loaded_handles(swtpm.tcti) == {"transient": [], "sessions": []}


def test_own_loaded_keys_give_way_to_load(swtpm, tmp_path) -> None:
    # Another client (as tpmsigner serve would) keeps its storage key
    # loaded, so with this process's storage key and one kept signing key
    # the emulator's three object slots are full.  Loading a second key
    # must flush the kept one instead of failing with out of object memory.
    store = tpmsigner.KeyStore(tmp_path / "home")
    with Tpm(swtpm.tcti) as other, Tpm(swtpm.tcti) as tpm:
        other.check_parents([])
        first = tpmsigner.create_identity(tpm, store, "first", PIN)
        second = tpmsigner.create_identity(tpm, store, "second", PIN)

        tpmsigner.sign_data(tpm, store, first, b"one", PIN)
        assert len(loaded_handles(swtpm.tcti)["transient"]) == 3
        signature = tpmsigner.sign_data(tpm, store, second, b"two", PIN)

        assert asyncssh.import_public_key(second.openssh_line()).verify(b"two", signature)
        assert len(loaded_handles(swtpm.tcti)["transient"]) == 3
        # The first key loads again the same way.
        signature = tpmsigner.sign_data(tpm, store, first, b"three", PIN)
        assert asyncssh.import_public_key(first.openssh_line()).verify(b"three", signature)


def test_parent_check_rejects_other_tpm(swtpm, tmp_path) -> None:
    # The documented check in docs/library.md: a TPM whose storage key has
    # another name than the one recorded is refused before a PIN is sent.
    home = tmp_path / "home"
    store = tpmsigner.KeyStore(home)
    with tpmsigner.Tpm(swtpm.tcti, parent_check=tpmsigner.TpmBinding(home).check) as tpm:
        identity = tpmsigner.create_identity(tpm, store, "work", PIN)
    assert (home / "tpm.json").exists()

    other = start_swtpm(tmp_path / "other-swtpm")
    try:
        counter_before = tpm_property(other.tcti, TPM2_PT.LOCKOUT_COUNTER)
        with tpmsigner.Tpm(other.tcti, parent_check=tpmsigner.TpmBinding(home).check) as other_tpm:
            with pytest.raises(tpmsigner.TpmBindingError, match="another TPM"):
                tpmsigner.sign_data(other_tpm, store, identity, b"payload", PIN)
        assert tpm_property(other.tcti, TPM2_PT.LOCKOUT_COUNTER) == counter_before
    finally:
        other.stop()
