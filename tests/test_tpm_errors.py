"""TPM failures a person meets, as the command line reports them."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

import asyncssh
import pytest
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_CC
from tpm2_pytss.TCTILdr import TCTILdr
from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE

import tpmsigner
from tests.support.chain import Chain
from tests.support.tpm_relay import TpmRelay, command_code
from tpmsigner.errors import TpmKeyLoadError, UnsupportedByTpmError
from tpmsigner.keytypes import KEY_TYPES
from tpmsigner.protocol.sshkeys import SSH_AGENT_RSA_SHA2_256
from tpmsigner.templates import srk_ecc_p256_template

PIN = "4711-tpm-errors"


def test_stopped_tpm_is_reported(chain: Chain, swtpm) -> None:
    chain.keygen("work", PIN)
    swtpm.stop()
    pin_file = chain.workdir / "pin"
    pin_file.write_text(PIN + "\n")

    result = chain.tpmsigner("keygen", "second", "--pin-file", str(pin_file), check=False)

    assert result.returncode == 1
    assert f"cannot open the TPM at TCTI {swtpm.tcti!r}" in result.stderr
    assert "Check that the TPM (or swtpm) is running" in result.stderr
    assert "Traceback" not in result.stderr


def test_list_and_show_work_without_tpm(chain: Chain, swtpm) -> None:
    public_line = chain.keygen("work", PIN)
    swtpm.stop()

    listed = chain.tpmsigner("list")
    shown = json.loads(chain.tpmsigner("show", "work", "--json").stdout)

    assert "work" in listed.stdout
    assert shown["public_key"] == public_line


def test_full_object_memory_is_reported(chain: Chain, swtpm) -> None:
    chain.keygen("work", PIN)
    # Another client without a resource manager fills swtpm's three object slots.
    hog = ESAPI(TCTILdr.parse(swtpm.tcti))
    handles = []
    try:
        for _ in range(3):
            handle, _, _, _, _ = hog.create_primary(
                TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=srk_ecc_p256_template()), ESYS_TR.RH_OWNER
            )
            handles.append(handle)
        pin_file = chain.workdir / "pin"
        pin_file.write_text(PIN + "\n")

        result = chain.tpmsigner("keygen", "second", "--pin-file", str(pin_file), check=False)
    finally:
        for handle in handles:
            hog.flush_context(handle)
        hog.close()

    assert result.returncode == 1
    assert "out of object memory" in result.stderr
    assert "resource manager" in result.stderr
    assert not (chain.signer_home / "keys" / "second.json").exists()


def test_full_object_memory_at_signing_is_reported(swtpm, tmp_path) -> None:
    store = tpmsigner.KeyStore(tmp_path / "home")
    tpm = tpmsigner.Tpm(swtpm.tcti)
    hog = ESAPI(TCTILdr.parse(swtpm.tcti))
    handles = []
    try:
        identity = tpmsigner.create_identity(tpm, store, "work", PIN.encode())
        # The storage key keeps one of swtpm's three object slots, and
        # another client without a resource manager takes the other two.
        for _ in range(2):
            handle, _, _, _, _ = hog.create_primary(
                TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=srk_ecc_p256_template()), ESYS_TR.RH_OWNER
            )
            handles.append(handle)

        with pytest.raises(tpmsigner.TpmError, match="out of object memory") as raised:
            tpmsigner.sign_data(tpm, store, identity, b"data", PIN.encode())
        assert not isinstance(raised.value, TpmKeyLoadError)

        for handle in handles:
            hog.flush_context(handle)
        handles.clear()
        signature = tpmsigner.sign_data(tpm, store, identity, b"data", PIN.encode())
        assert asyncssh.import_public_key(identity.openssh_line()).verify(b"data", signature)
    finally:
        for handle in handles:
            hog.flush_context(handle)
        hog.close()
        tpm.close()


def without_algorithm(algorithm: int) -> Callable[[bytes, bytes], bytes]:
    """Return a relay change that removes ``algorithm`` from the TPM's list of implemented algorithms.

    The response to TPM2_GetCapability with TPM_CAP_ALGS (TPM 2.0 Library
    Part 3) holds moreData, the capability and a TPML_ALG_PROPERTY, which is
    a count and then a 2-byte algorithm id and 4-byte attributes per entry.
    """

    def change(command: bytes, response: bytes) -> bytes:
        if command_code(command) != TPM2_CC.GetCapability or struct.unpack_from(">I", command, 10)[0] != TPM2_CAP.ALGS:
            return response
        if struct.unpack_from(">I", response, 6)[0] != 0:
            return response
        (count,) = struct.unpack_from(">I", response, 15)
        entries = [response[19 + 6 * index : 25 + 6 * index] for index in range(count)]
        kept = [entry for entry in entries if struct.unpack_from(">H", entry)[0] != algorithm]
        body = response[10:15] + struct.pack(">I", len(kept)) + b"".join(kept)
        return response[:2] + struct.pack(">I", 10 + len(body)) + response[6:10] + body

    return change


def test_missing_hash_is_reported(swtpm, tmp_path) -> None:
    # swtpm implements every hash, so a relay removes SHA-1 from the list of
    # algorithms that the TPM reports.
    store = tpmsigner.KeyStore(tmp_path / "home")
    remove_sha1 = without_algorithm(TPM2_ALG.SHA1)
    sent: list[int] = []

    def record_and_change(command: bytes, response: bytes) -> bytes:
        sent.append(command_code(command))
        return remove_sha1(command, response)

    with TpmRelay(swtpm.server_port, swtpm.ctrl_port) as relay:
        relay.change = record_and_change
        tpm = tpmsigner.Tpm(relay.tcti)
        try:
            identity = tpmsigner.create_identity(tpm, store, "rsa", PIN.encode(), KEY_TYPES["rsa-2048"])

            sent.clear()
            with pytest.raises(UnsupportedByTpmError, match="does not implement SHA1"):
                tpmsigner.sign_data(tpm, store, identity, b"data", PIN.encode(), flags=0)
            sent_for_sha1 = list(sent)

            signature = tpmsigner.sign_data(tpm, store, identity, b"data", PIN.encode(), flags=SSH_AGENT_RSA_SHA2_256)
        finally:
            tpm.close()

    # The request was rejected before the PIN went to the TPM.
    assert TPM2_CC.Sign not in sent_for_sha1
    assert signature[4:16] == b"rsa-sha2-256"
    assert asyncssh.import_public_key(identity.openssh_line()).verify(b"data", signature)
