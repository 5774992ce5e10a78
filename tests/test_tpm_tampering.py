"""Changed TPM responses, lost sessions and restarts, against a real swtpm.

A relay on the TPM's port (tests.support.tpm_relay) takes the place of an
attacker on the TPM bus and changes swtpm's real responses.  After each fault,
``Tpm`` must raise a clear error, return no signature, count no PIN try,
sign the next request, and leave no object or session loaded on swtpm, which
has only three object slots and no resource manager.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncssh
import pytest
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_CAP, TPM2_HT
from tpm2_pytss.TCTILdr import TCTILdr
from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE

import tpmsigner
from tpmsigner import tpmsession
from tpmsigner.templates import srk_ecc_p256_template
from tpmsigner.tpm import PARENT_OWNER, Tpm
from tpmsigner.tpmsession import TpmResponseError
from tests.support.tpm_relay import TpmRelay, command_code

PIN = b"pin-Tamper-5820"


def loaded_handles(tcti: str) -> dict[str, list[int]]:
    """Return the transient objects and loaded sessions on the TPM, asked over a new connection."""
    esapi = ESAPI(TCTILdr.parse(tcti))
    try:
        handles = {}
        for name, handle_type in (("transient", TPM2_HT.TRANSIENT), ("sessions", TPM2_HT.LOADED_SESSION)):
            _, data = esapi.get_capability(TPM2_CAP.HANDLES, handle_type << 24, 64)
            handles[name] = list(data.data.handles)
        return handles
    finally:
        esapi.close()


def failed_tries(tcti: str) -> int:
    with Tpm(tcti) as tpm:
        return tpm.lockout_status().failed_tries


def with_size(response: bytes) -> bytes:
    """Return ``response`` with its header's size field set to its length, as a careful attacker would."""
    return response[:2] + struct.pack(">I", len(response)) + response[6:]


def change_once(code: int, change: Callable[[bytes], bytes]) -> Callable[[bytes, bytes], bytes]:
    """Return a relay change that applies ``change`` to the first response to command ``code``."""
    pending = [change]

    def apply(command: bytes, response: bytes) -> bytes:
        if command_code(command) == code and pending:
            return pending.pop()(response)
        return response

    return apply


@pytest.fixture
def relay(swtpm) -> Iterator[TpmRelay]:
    with TpmRelay(swtpm.server_port, swtpm.ctrl_port) as tpm_relay:
        yield tpm_relay


@pytest.fixture
def signing(relay, tmp_path: Path) -> Iterator[tuple[Tpm, tpmsigner.KeyStore, tpmsigner.Identity]]:
    """A Tpm reached through the relay, with one key that has signed once, so its session is started."""
    store = tpmsigner.KeyStore(tmp_path / "home")
    tpm = Tpm(relay.tcti)
    try:
        identity = tpmsigner.create_identity(tpm, store, "work", PIN)
        tpmsigner.sign_data(tpm, store, identity, b"warm-up", PIN)
        yield tpm, store, identity
    finally:
        tpm.close()


def check_next_signature(tpm: Tpm, store: tpmsigner.KeyStore, identity: tpmsigner.Identity) -> None:
    signature = tpmsigner.sign_data(tpm, store, identity, b"next request", PIN)
    assert asyncssh.import_public_key(identity.openssh_line()).verify(b"next request", signature)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda response: response[:20] + bytes([response[20] ^ 0x01]) + response[21:], "HMAC check"),
        (lambda response: with_size(response + b"\0"), "after its last field"),
        (lambda response: with_size(response[:-5]), "ends early"),
        (lambda response: with_size(response + bytes(5000)), "5000 bytes after its last field"),
    ],
    ids=["flipped-bit", "trailing-byte", "cut-short", "oversized"],
)
def test_changed_sign_response_is_rejected(signing, relay, swtpm, change, message: str) -> None:
    tpm, store, identity = signing
    tries_before = failed_tries(swtpm.tcti)
    relay.change = change_once(tpmsession.TPM_CC_SIGN, change)

    with pytest.raises(TpmResponseError, match=message):
        tpmsigner.sign_data(tpm, store, identity, b"changed on the way", PIN)

    assert failed_tries(swtpm.tcti) == tries_before
    check_next_signature(tpm, store, identity)
    tpm.close()
    assert loaded_handles(swtpm.tcti) == {"transient": [], "sessions": []}


@pytest.mark.parametrize(
    "change",
    [lambda response: with_size(response + b"\0"), lambda response: with_size(response[:-3])],
    ids=["trailing-byte", "cut-short"],
)
def test_malformed_session_start_flushes_the_session(signing, relay, swtpm, change) -> None:
    tpm, store, identity = signing
    tpm._drop_session()  # noqa: SLF001 - so that the next request starts a session
    relay.change = change_once(tpmsession.TPM_CC_START_AUTH_SESSION, change)

    with pytest.raises(TpmResponseError):
        tpm.check_ready(PARENT_OWNER)

    # swtpm started the session, so the client that cannot use it must flush it.
    assert loaded_handles(swtpm.tcti)["sessions"] == []
    check_next_signature(tpm, store, identity)
    tpm.close()
    assert loaded_handles(swtpm.tcti) == {"transient": [], "sessions": []}


def test_session_flushed_by_another_client_leaves_no_key(signing, swtpm) -> None:
    tpm, _, _ = signing
    # Another client flushes the session (as `serve` does with handles it
    # takes for stale), so Tpm's own flush of it fails when it closes.
    other = ESAPI(TCTILdr.parse(swtpm.tcti))
    try:
        (session,) = loaded_handles(swtpm.tcti)["sessions"]
        other.flush_context(other.tr_from_tpmpublic(session))
    finally:
        other.close()

    tpm.close()

    assert loaded_handles(swtpm.tcti) == {"transient": [], "sessions": []}


@pytest.mark.parametrize("flushed", ["sessions", "transient"])
def test_handle_flushed_by_another_client(signing, swtpm, flushed: str) -> None:
    tpm, store, identity = signing
    # Without a resource manager, another client can flush Tpm's session or
    # its signing key (the last transient object loaded), with no restart.
    other = ESAPI(TCTILdr.parse(swtpm.tcti))
    try:
        handle = loaded_handles(swtpm.tcti)[flushed][-1]
        other.flush_context(other.tr_from_tpmpublic(handle))
    finally:
        other.close()

    with pytest.raises(tpmsigner.TpmUnavailableError, match="no longer has"):
        tpmsigner.sign_data(tpm, store, identity, b"after the flush", PIN)

    # Tpm flushed what it still had loaded, so swtpm has room for the next request.
    assert loaded_handles(swtpm.tcti) == {"transient": [], "sessions": []}
    check_next_signature(tpm, store, identity)
    tpm.close()
    assert loaded_handles(swtpm.tcti) == {"transient": [], "sessions": []}


def test_restart_leaves_other_clients_objects(swtpm, tmp_path: Path) -> None:
    store = tpmsigner.KeyStore(tmp_path / "home")
    tpm = Tpm(swtpm.tcti)
    other: ESAPI | None = None
    try:
        identity = tpmsigner.create_identity(tpm, store, "work", PIN)
        tpmsigner.sign_data(tpm, store, identity, b"before the restart", PIN)
        # The storage key and the signing key are the TPM's first two objects.
        assert loaded_handles(swtpm.tcti)["transient"] == [0x80000000, 0x80000001]
        tcti = swtpm.tcti
        swtpm.stop()
        assert swtpm.start() == tcti

        # After the restart, another client's object gets the handle that
        # Tpm still has cached for its signing key.
        other = ESAPI(TCTILdr.parse(swtpm.tcti))
        template = TPM2B_PUBLIC(publicArea=srk_ecc_p256_template())
        first, _, _, _, _ = other.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.RH_OWNER)
        second, _, _, _, _ = other.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.RH_ENDORSEMENT)
        other.flush_context(first)
        assert loaded_handles(swtpm.tcti)["transient"] == [0x80000001]
        name = bytes(other.tr_get_name(second))

        check_next_signature(tpm, store, identity)

        _, name_now, _ = other.read_public(second)
        assert bytes(name_now) == name
        other.flush_context(second)
    finally:
        tpm.close()
        if other is not None:
            other.close()
    assert loaded_handles(swtpm.tcti) == {"transient": [], "sessions": []}
