"""Key files shared with another TSS2 key-file consumer: OpenSSL 3 with tpm2-openssl.

Debian's tpm2-openssl package installs the provider module tpm2.so, which
reads its TCTI from TPM2OPENSSL_TCTI.  PINs reach openssl only through
``-passin file:``, never on its command line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss.constants import TPMA_OBJECT
from tpm2_pytss.tsskey import TSSPrivKey

from tests.support import Swtpm
from tests.support.chain import Chain

PIN = "4711-interop"
DATA = b"signed by openssl through the tpm2 provider\n"


def tpm2_provider_module() -> Path | None:
    """Return the path of the tpm2 provider module, or None if openssl or the module is missing."""
    if shutil.which("openssl") is None:
        return None
    result = subprocess.run(["openssl", "version", "-m"], capture_output=True, text=True, timeout=30)
    match = re.search(r'MODULESDIR: "([^"]+)"', result.stdout)
    if match is None:
        return None
    module = Path(match.group(1)) / "tpm2.so"
    return module if module.is_file() else None


pytestmark = pytest.mark.skipif(
    tpm2_provider_module() is None,
    reason="openssl or its tpm2 provider module (Debian package tpm2-openssl) is not installed",
)


def openssl(swtpm: Swtpm, *args: str) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ)
    environment["TPM2OPENSSL_TCTI"] = swtpm.tcti
    return subprocess.run(
        ["openssl", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def write_pin_file(path: Path, pin: str) -> Path:
    path.write_text(pin + "\n")
    path.chmod(0o600)
    return path


def openssl_sign(swtpm: Swtpm, key_file: Path, pin_file: Path, data_file: Path, signature_file: Path):
    return openssl(
        swtpm,
        "pkeyutl",
        "-provider",
        "tpm2",
        "-provider",
        "default",
        "-propquery",
        "?provider=tpm2",
        "-sign",
        "-inkey",
        str(key_file),
        "-passin",
        f"file:{pin_file}",
        "-rawin",
        "-digest",
        "sha256",
        "-in",
        str(data_file),
        "-out",
        str(signature_file),
    )


def getcap(swtpm: Swtpm, capability: str) -> str:
    result = subprocess.run(
        ["tpm2_getcap", "-T", swtpm.tcti, capability], check=True, capture_output=True, text=True, timeout=30
    )
    return result.stdout


def lockout_counter(swtpm: Swtpm) -> int:
    match = re.search(r"TPM2_PT_LOCKOUT_COUNTER: (0x[0-9a-fA-F]+)", getcap(swtpm, "properties-variable"))
    assert match is not None, "tpm2_getcap printed no TPM2_PT_LOCKOUT_COUNTER"
    return int(match.group(1), 16)


def public_key_of(chain: Chain, label: str) -> ec.EllipticCurvePublicKey:
    shown = json.loads(chain.tpmsigner("show", label, "--json").stdout)
    key = serialization.load_ssh_public_key(shown["public_key"].encode())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def test_openssl_signs_with_keygen_key(chain: Chain, swtpm: Swtpm) -> None:
    chain.keygen("work", PIN)
    key_file = chain.signer_home / "keys" / "work.tss"
    key_before = key_file.read_bytes()
    pin_file = write_pin_file(chain.workdir / "openssl.pin", PIN)
    data_file = chain.workdir / "data"
    data_file.write_bytes(DATA)
    signature_file = chain.workdir / "data.sig"

    result = openssl_sign(swtpm, key_file, pin_file, data_file, signature_file)

    assert result.returncode == 0, result.stderr
    public_key = public_key_of(chain, "work")
    # verify() raises InvalidSignature on a mismatch.
    public_key.verify(signature_file.read_bytes(), DATA, ec.ECDSA(hashes.SHA256()))
    assert key_file.read_bytes() == key_before
    # swtpm reports three object slots and is used without a resource
    # manager, so a transient object left behind would block the signer.
    assert getcap(swtpm, "handles-transient").strip() == ""


def test_openssl_signature_fails_with_other_data(chain: Chain, swtpm: Swtpm) -> None:
    chain.keygen("work", PIN)
    pin_file = write_pin_file(chain.workdir / "openssl.pin", PIN)
    data_file = chain.workdir / "data"
    data_file.write_bytes(DATA)
    signature_file = chain.workdir / "data.sig"

    result = openssl_sign(swtpm, chain.signer_home / "keys" / "work.tss", pin_file, data_file, signature_file)

    assert result.returncode == 0, result.stderr
    with pytest.raises(InvalidSignature):
        public_key_of(chain, "work").verify(signature_file.read_bytes(), DATA + b"x", ec.ECDSA(hashes.SHA256()))


def test_openssl_wrong_pin_counts_toward_lockout(chain: Chain, swtpm: Swtpm) -> None:
    chain.keygen("work", PIN)
    pin_file = write_pin_file(chain.workdir / "wrong.pin", "not-the-pin")
    data_file = chain.workdir / "data"
    data_file.write_bytes(DATA)
    signature_file = chain.workdir / "data.sig"
    counter_before = lockout_counter(swtpm)

    result = openssl_sign(swtpm, chain.signer_home / "keys" / "work.tss", pin_file, data_file, signature_file)

    assert result.returncode != 0
    assert "authorization HMAC check failed and DA counter incremented" in result.stderr
    # The key has dictionary-attack protection for every consumer, not only tpmsigner.
    assert lockout_counter(swtpm) == counter_before + 1
    assert getcap(swtpm, "handles-transient").strip() == ""


def generate_openssl_key(chain: Chain, swtpm: Swtpm) -> Path:
    """Create a P-256 key with tpm2-openssl's own template and an empty authorisation value.

    tpm2-openssl 1.1.1 takes a key's PIN only as ``-pkeyopt user-auth:PIN``
    on the command line, so the key gets none.  Its attributes do not depend
    on the PIN.
    """
    key_file = chain.workdir / "openssl-key.pem"
    result = openssl(
        swtpm,
        "genpkey",
        "-provider",
        "tpm2",
        "-provider",
        "default",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "group:P-256",
        "-out",
        str(key_file),
    )
    assert result.returncode == 0, result.stderr
    return key_file


def test_openssl_key_has_da_protection_and_decrypt(chain: Chain, swtpm: Swtpm) -> None:
    key = TSSPrivKey.from_pem(generate_openssl_key(chain, swtpm).read_bytes())
    attributes = int(key.public.publicArea.objectAttributes)

    assert not attributes & TPMA_OBJECT.NODA
    assert attributes & TPMA_OBJECT.USERWITHAUTH
    assert attributes & TPMA_OBJECT.SIGN_ENCRYPT
    assert attributes & TPMA_OBJECT.DECRYPT
    assert key.parent == 0x40000001


def test_import_rejects_openssl_key_without_pin(chain: Chain, swtpm: Swtpm) -> None:
    key_file = generate_openssl_key(chain, swtpm)

    result = chain.tpmsigner("import", str(key_file), "from-openssl", check=False)

    assert result.returncode == 1
    assert "empty authorisation value" in result.stderr
    assert not (chain.signer_home / "keys" / "from-openssl.json").exists()


def test_import_rejects_openssl_sign_and_decrypt_key(chain: Chain, swtpm: Swtpm) -> None:
    key = TSSPrivKey.from_pem(generate_openssl_key(chain, swtpm).read_bytes())
    # Clear the file's emptyAuth flag, as a key made with user-auth has it,
    # so that import reaches the attribute check.
    key_file = chain.workdir / "openssl-key-with-auth-flag.pem"
    key_file.write_bytes(TSSPrivKey(key.private, key.public, empty_auth=False, parent=key.parent).to_pem())

    result = chain.tpmsigner("import", str(key_file), "from-openssl", check=False)

    assert result.returncode == 1
    assert "|decrypt|" in result.stderr
    assert "no decrypt, noDA or restricted" in result.stderr
    assert not (chain.signer_home / "keys" / "from-openssl.json").exists()
