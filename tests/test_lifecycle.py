"""Identity lifecycle on the command line: show, disable, delete, rotate, change-pin, import."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import asyncssh
import pytest
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR
from tpm2_pytss.TCTILdr import TCTILdr
from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE

import tpmsigner
from tpmsigner import cli as tpmsigner_cli
from tpmsigner.errors import StateWriteError, TpmAuthError
from tpmsigner.keyfile import encode_key_file, read_key_file
from tpmsigner.templates import SRK_PERSISTENT_HANDLE, srk_ecc_p256_template
from tpmsigner.tpm import Tpm
from tests.support import start_swtpm
from tests.support.chain import Chain

PIN = "4711-lifecycle"


def files_of(directory) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


def test_show_and_list_json(chain: Chain) -> None:
    public_line = chain.keygen("work", PIN)

    shown = json.loads(chain.tpmsigner("show", "work", "--json").stdout)
    listed = json.loads(chain.tpmsigner("list", "--json").stdout)
    text = chain.tpmsigner("show", "work").stdout

    assert shown["public_key"] == public_line
    assert shown["key_type"] == "ecdsa-p256"
    assert shown["enabled"] is True
    assert shown["last_used"] is None
    assert listed == [shown]
    assert public_line in text
    assert "last used:" in text


def test_disabled_identity_is_hidden_and_rejected(chain: Chain) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    chain.start_agent()
    assert chain.ssh_add("-L").stdout.strip() == public_line

    chain.tpmsigner("disable", "work")

    assert "ecdsa" not in chain.ssh_add("-L").stdout

    async def sign_with_named_blob() -> bytes:
        # Name the disabled key's blob directly, as a hostile client would.
        async with asyncssh.connect_agent(str(chain.agent_socket)) as agent:
            key = asyncssh.import_public_key(public_line)
            keypair = asyncssh.agent.SSHAgentKeyPair(agent, key.algorithm, key.public_data, b"work")
            return await keypair.sign_async(b"data")

    with pytest.raises(ValueError):
        asyncio.run(asyncio.wait_for(sign_with_named_blob(), 30))
    assert chain.approver_requests() == []
    assert chain.signer is not None
    assert "names disabled key 'work': rejected" in chain.signer.log_text()

    chain.tpmsigner("enable", "work")
    assert chain.ssh_add("-L").stdout.strip() == public_line


def test_last_used_is_recorded(chain: Chain) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    chain.start_agent()

    async def sign() -> bytes:
        async with asyncssh.connect_agent(str(chain.agent_socket)) as agent:
            keys = await agent.get_keys()
            return await keys[0].sign_async(b"data")

    asyncio.run(asyncio.wait_for(sign(), 30))

    shown = json.loads(chain.tpmsigner("show", "work", "--json").stdout)
    assert shown["last_used"] is not None
    assert shown["public_key"] == public_line


def test_delete_needs_confirmation(chain: Chain) -> None:
    chain.keygen("work", PIN)
    keys_dir = chain.signer_home / "keys"

    refused = chain.tpmsigner("delete", "work", check=False)
    assert refused.returncode == 1
    assert "deleting identity 'work', whose key cannot be recovered, needs confirmation on a terminal" in refused.stderr
    assert "--yes" in refused.stderr
    assert sorted(files_of(keys_dir)) == ["work.json", "work.tss"]

    chain.tpmsigner("delete", "work", "--yes")
    assert files_of(keys_dir) == {}
    missing = chain.tpmsigner("show", "work", check=False)
    assert missing.returncode == 1
    assert "no identity labelled 'work'" in missing.stderr


def test_rotate_keeps_old_key_disabled(chain: Chain) -> None:
    old_line = chain.keygen("work", PIN)
    pin_file = chain.workdir / "new.pin"
    pin_file.write_text("new-" + PIN + "\n")

    new_line = chain.tpmsigner("rotate", "work", "--pin-file", str(pin_file)).stdout.strip()

    listed = {entry["label"]: entry for entry in json.loads(chain.tpmsigner("list", "--json").stdout)}
    assert new_line != old_line
    assert new_line.endswith(" work")
    assert listed["work"]["public_key"] == new_line
    archived = [label for label in listed if label.startswith("work.old-")]
    assert len(archived) == 1
    assert listed[archived[0]]["enabled"] is False
    assert listed[archived[0]]["public_key"].split()[:2] == old_line.split()[:2]


def test_change_pin_replaces_key_file(chain: Chain, swtpm) -> None:
    chain.keygen("work", PIN)
    old_pin_file = chain.workdir / "old.pin"
    old_pin_file.write_text(PIN + "\n")
    new_pin_file = chain.workdir / "new.pin"
    new_pin_file.write_text("changed-" + PIN + "\n")
    key_path = chain.signer_home / "keys" / "work.tss"
    before = key_path.read_bytes()

    chain.tpmsigner("change-pin", "work", "--pin-file", str(old_pin_file), "--new-pin-file", str(new_pin_file))

    assert key_path.read_bytes() != before
    assert os.stat(key_path).st_mode & 0o777 == 0o600
    store = tpmsigner.KeyStore(chain.signer_home)
    identity = store.get("work")
    with Tpm(swtpm.tcti) as tpm:
        signature = tpmsigner.sign_data(tpm, store, identity, b"data", ("changed-" + PIN).encode())
        with pytest.raises(TpmAuthError):
            tpmsigner.sign_data(tpm, store, identity, b"data", PIN.encode())
    assert asyncssh.import_public_key(identity.openssh_line()).verify(b"data", signature)


def test_change_pin_with_wrong_old_pin_keeps_file(chain: Chain) -> None:
    chain.keygen("work", PIN)
    wrong = chain.workdir / "wrong.pin"
    wrong.write_text("not-the-pin\n")
    new = chain.workdir / "new.pin"
    new.write_text("whatever-new\n")
    key_path = chain.signer_home / "keys" / "work.tss"
    before = key_path.read_bytes()

    result = chain.tpmsigner("change-pin", "work", "--pin-file", str(wrong), "--new-pin-file", str(new), check=False)

    assert result.returncode == 1
    assert "wrong PIN" in result.stderr
    assert "tries left" in result.stderr
    assert key_path.read_bytes() == before


def der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(encoded)]) + encoded


def der(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + der_length(len(value)) + value


def key_file_with_description(blob: tpmsigner.TpmKeyBlob, description: str) -> bytes:
    """Build a key file the way ssh-tpm-agent writes one, with the [4] description."""
    body = (
        der(0x06, bytes([0x67, 0x81, 0x05, 0x0A, 0x01, 0x03]))
        + der(0xA0, der(0x01, b"\x00"))
        + der(0xA4, der(0x0C, description.encode()))
        + der(0x02, blob.parent.to_bytes(5, "big").lstrip(b"\x00").rjust(5, b"\x00")[-5:].lstrip(b"\x00")
              if blob.parent < 0x80000000 else b"\x00" + blob.parent.to_bytes(4, "big"))
        + der(0x04, blob.public)
        + der(0x04, blob.private)
    )
    import base64

    encoded = base64.encodebytes(der(0x30, body)).replace(b"\n", b"")
    lines = [encoded[i : i + 64] for i in range(0, len(encoded), 64)]
    return b"-----BEGIN TSS2 PRIVATE KEY-----\n" + b"\n".join(lines) + b"\n-----END TSS2 PRIVATE KEY-----\n"


def test_import_keeps_description(chain: Chain, swtpm) -> None:
    with Tpm(swtpm.tcti) as tpm:
        blob = tpm.create_key(PIN.encode())
    key_file = chain.workdir / "from-another-tool.tpm"
    key_file.write_bytes(key_file_with_description(blob, "made by another tool"))
    assert read_key_file(key_file.read_bytes()).description == "made by another tool"

    public_line = chain.tpmsigner("import", str(key_file), "imported").stdout.strip()

    shown = json.loads(chain.tpmsigner("show", "imported", "--json").stdout)
    assert shown["public_key"] == public_line
    assert shown["description"] == "made by another tool"


def test_import_rejects_no_da_key(chain: Chain, swtpm) -> None:
    esapi = ESAPI(TCTILdr.parse(swtpm.tcti))
    try:
        key = tpmsigner_tsskey_create(esapi)
    finally:
        esapi.close()
    key_file = chain.workdir / "noda.pem"
    key_file.write_bytes(key.to_pem())

    result = chain.tpmsigner("import", str(key_file), "noda", check=False)

    assert result.returncode == 1
    assert "noDA" in result.stderr
    assert not (chain.signer_home / "keys" / "noda.json").exists()


def tpmsigner_tsskey_create(esapi):
    from tpm2_pytss.tsskey import TSSPrivKey

    key = TSSPrivKey.create_ecc(esapi, password=b"1234")
    # TSSPrivKey leaves the primary it made loaded; flush what it left.
    from tpm2_pytss.constants import TPM2_CAP, TPM2_HT

    _, data = esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 64)
    for handle in list(data.data.handles):
        esapi.flush_context(esapi.tr_from_tpmpublic(handle))
    return key


def test_import_rejects_key_of_another_tpm(chain: Chain, tmp_path) -> None:
    other = start_swtpm(tmp_path / "other-swtpm")
    try:
        with Tpm(other.tcti) as tpm:
            blob = tpm.create_key(PIN.encode())
    finally:
        other.stop()
    key_file = chain.workdir / "foreign.tss"
    key_file.write_bytes(encode_key_file(blob))

    result = chain.tpmsigner("import", str(key_file), "foreign", check=False)

    assert result.returncode == 1
    assert "does not load on this TPM" in result.stderr
    assert not (chain.signer_home / "keys" / "foreign.json").exists()


def test_status_reports_tpm_and_identities(chain: Chain) -> None:
    chain.keygen("work", PIN)
    chain.keygen("spare", PIN)
    chain.tpmsigner("disable", "spare")

    status = json.loads(chain.tpmsigner("status", "--json").stdout)
    text = chain.tpmsigner("status").stdout

    assert status["identities"] == {"total": 2, "enabled": 1}
    assert status["tpm"]["manufacturer"] == "IBM"
    assert "ecdsa-p256" in status["tpm"]["supported_key_types"]
    assert status["dictionary_attack"]["in_lockout"] is False
    assert status["dictionary_attack"]["tries_left"] == status["dictionary_attack"]["max_tries"]
    assert list(status["storage_keys"]) == ["0x40000001"]
    assert "2 (1 enabled)" in text
    storage_line = next(line for line in text.splitlines() if line.startswith("storage key:"))
    assert "owner-hierarchy primary (created on demand)" in storage_line
    assert "0x40000001" not in storage_line
    assert status["storage_keys"]["0x40000001"] in storage_line


def test_status_names_persistent_storage_key(chain: Chain, swtpm) -> None:
    esapi = ESAPI(TCTILdr.parse(swtpm.tcti))
    try:
        primary, _, _, _, _ = esapi.create_primary(
            TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=srk_ecc_p256_template()), ESYS_TR.RH_OWNER
        )
        esapi.evict_control(ESYS_TR.RH_OWNER, primary, SRK_PERSISTENT_HANDLE)
        esapi.flush_context(primary)
    finally:
        esapi.close()
    chain.keygen("work", PIN)

    status = json.loads(chain.tpmsigner("status", "--json").stdout)
    text = chain.tpmsigner("status").stdout

    assert list(status["storage_keys"]) == ["0x81000001"]
    storage_line = next(line for line in text.splitlines() if line.startswith("storage key:"))
    assert "persistent key 0x81000001" in storage_line
    assert status["storage_keys"]["0x81000001"] in storage_line


def test_home_on_another_tpm_is_refused(chain: Chain, tmp_path) -> None:
    chain.keygen("work", PIN)
    before = files_of(chain.signer_home / "keys")
    binding_before = (chain.signer_home / "tpm.json").read_bytes()

    other = start_swtpm(tmp_path / "other-swtpm")
    try:
        environment = chain.environment()
        environment["TPMSIGNER_TCTI"] = other.tcti
        result = subprocess.run(
            [*chain_signer_command(chain), "status"],
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    finally:
        other.stop()

    assert result.returncode == 1
    assert "another TPM, the TPM was cleared" in result.stderr
    assert "owner-hierarchy primary" in result.stderr
    assert "0x40000001" not in result.stderr
    assert files_of(chain.signer_home / "keys") == before
    assert (chain.signer_home / "tpm.json").read_bytes() == binding_before


def chain_signer_command(chain: Chain) -> list[str]:
    from tests.support.chain import SIGNER_COMMAND

    return [*SIGNER_COMMAND, "--home", str(chain.signer_home)]


def test_cleared_tpm_is_refused(chain: Chain, swtpm) -> None:
    chain.keygen("work", PIN)
    before = files_of(chain.signer_home / "keys")

    subprocess.run(["tpm2_clear", "-T", swtpm.tcti, "-c", "p"], check=True, capture_output=True, timeout=30)
    result = chain.tpmsigner("status", check=False)

    assert result.returncode == 1
    assert "the TPM was cleared" in result.stderr
    assert files_of(chain.signer_home / "keys") == before


@pytest.mark.parametrize("tpm_change", ["cleared", "another"])
def test_serve_refuses_to_start_on_changed_tpm(chain: Chain, swtpm, tmp_path, tpm_change: str) -> None:
    chain.keygen("work", PIN)
    serve = [
        "serve", "--listen", f"127.0.0.1:{chain.signer_port}",
        "--approver", f"command:{chain.approver_program}", "--no-mdns",
    ]  # fmt: skip

    if tpm_change == "cleared":
        subprocess.run(["tpm2_clear", "-T", swtpm.tcti, "-c", "p"], check=True, capture_output=True, timeout=30)
        # A serve that started anyway would run until this timeout and fail the test.
        result = chain.tpmsigner(*serve, check=False, timeout=30)
    else:
        other = start_swtpm(tmp_path / "other-swtpm")
        try:
            result = chain.tpmsigner("--tcti", other.tcti, *serve, check=False, timeout=30)
        finally:
            other.stop()

    assert result.returncode == 1
    assert "the TPM was cleared" in result.stderr
    assert "Traceback" not in result.stderr
    assert chain.approver_requests() == []


def test_listing_sees_edits_by_hand(chain: Chain) -> None:
    chain.keygen("work", PIN)
    store = tpmsigner.KeyStore(chain.signer_home)
    assert store.list()[0].enabled is True

    metadata = chain.signer_home / "keys" / "work.json"
    record = json.loads(metadata.read_text())
    record["enabled"] = False
    metadata.write_text(json.dumps(record))

    assert store.list()[0].enabled is False
    chain.tpmsigner("enable", "work")
    assert store.list()[0].enabled is True


def test_rotate_failure_keeps_old_key(swtpm, tmp_path, monkeypatch, capsys) -> None:
    # A full disk can fail the new key's write after the old key moved to
    # its archive label.  A real disk gets there only in a race with
    # another writer, so the store's add is made to fail here.
    home = tmp_path / "home"
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN + "\n")
    common = ["--home", str(home), "--tcti", swtpm.tcti]
    assert tpmsigner_cli.main([*common, "keygen", "work", "--pin-file", str(pin_file)]) == 0
    before = files_of(home / "keys")

    def full_disk(self, label, blob, description=None):
        raise StateWriteError(f"cannot write {home}/keys/{label}.tss: No space left on device")

    monkeypatch.setattr(tpmsigner.KeyStore, "add", full_disk)
    capsys.readouterr()
    status = tpmsigner_cli.main([*common, "rotate", "work", "--pin-file", str(pin_file)])

    stderr = capsys.readouterr().err
    assert status == 1
    assert "rotating 'work' failed: cannot write" in stderr
    assert "the old key is unchanged under 'work'" in stderr
    assert files_of(home / "keys") == before
