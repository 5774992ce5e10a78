"""The pyca/cryptography and asyncssh key objects of the library."""

from __future__ import annotations

import asyncio
import hashlib

import asyncssh
import pytest
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

import tpmsigner

PIN = b"4711-library-keys"


@pytest.fixture
def keys(swtpm, tmp_path):
    tpm = tpmsigner.Tpm(swtpm.tcti)
    store = tpmsigner.KeyStore(tmp_path / "home")
    ecdsa = tpmsigner.create_identity(tpm, store, "ec", PIN)
    rsa_identity = tpmsigner.create_identity(tpm, store, "rsa", PIN, tpmsigner.KEY_TYPES["rsa-2048"])
    yield tpm, store, ecdsa, rsa_identity
    tpm.close()


def test_pyca_ecdsa_key_signs_and_verifies(keys) -> None:
    tpm, store, identity, _ = keys
    pins_asked = []

    def pin() -> bytes:
        pins_asked.append(1)
        return PIN

    key = tpmsigner.private_key_for(tpm, store, identity, pin)
    signature = key.sign(b"message", ec.ECDSA(hashes.SHA256()))
    prehashed = key.sign(hashlib.sha384(b"message").digest(), ec.ECDSA(Prehashed(hashes.SHA384())))

    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.key_size == 256
    assert isinstance(key.curve, ec.SECP256R1)
    key.public_key().verify(signature, b"message", ec.ECDSA(hashes.SHA256()))
    key.public_key().verify(prehashed, b"message", ec.ECDSA(hashes.SHA384()))
    assert len(pins_asked) == 2


def test_pyca_rsa_key_signs_pkcs1v15_only(keys) -> None:
    tpm, store, _, identity = keys
    key = tpmsigner.private_key_for(tpm, store, identity, lambda: PIN.decode())

    signature = key.sign(b"message", padding.PKCS1v15(), hashes.SHA512())

    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048
    key.public_key().verify(signature, b"message", padding.PKCS1v15(), hashes.SHA512())
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    with pytest.raises(UnsupportedAlgorithm, match="PKCS1v15"):
        key.sign(b"message", pss, hashes.SHA256())


def test_pyca_keys_refuse_export_and_decryption(keys) -> None:
    tpm, store, ecdsa, rsa_identity = keys
    ec_key = tpmsigner.private_key_for(tpm, store, ecdsa, lambda: PIN)
    rsa_key = tpmsigner.private_key_for(tpm, store, rsa_identity, lambda: PIN)

    with pytest.raises(UnsupportedAlgorithm, match="cannot be exported"):
        ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(UnsupportedAlgorithm, match="cannot be exported"):
        rsa_key.private_numbers()
    with pytest.raises(UnsupportedAlgorithm, match="ECDH is not allowed"):
        ec_key.exchange(ec.ECDH(), ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(UnsupportedAlgorithm, match="decryption is not allowed"):
        rsa_key.decrypt(b"\0" * 256, padding.PKCS1v15())


def test_pyca_wrong_pin_raises_auth_error(keys) -> None:
    tpm, store, identity, _ = keys
    key = tpmsigner.private_key_for(tpm, store, identity, lambda: b"wrong")
    with pytest.raises(tpmsigner.TpmAuthError, match="wrong PIN"):
        key.sign(b"message", ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("label", ["ec", "rsa"])
def test_asyncssh_server_accepts_tpm_client_key(keys, label: str) -> None:
    tpm, store, ecdsa, rsa_identity = keys
    identity = ecdsa if label == "ec" else rsa_identity
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_public = asyncssh.import_public_key(identity.openssh_line())

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return True

        def public_key_auth_supported(self) -> bool:
            return True

        def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
            return key.public_data == client_public.public_data

    async def handle(process: asyncssh.SSHServerProcess) -> None:
        process.stdout.write(f"hello {process.get_extra_info('username')}\n")
        process.exit(0)

    async def run() -> str:
        server = await asyncssh.listen(
            "127.0.0.1", 0, server_host_keys=[host_key], server_factory=Server, process_factory=handle
        )
        try:
            port = server.sockets[0].getsockname()[1]
            keypair = tpmsigner.TpmSSHKeyPair(tpm, store, identity, lambda: PIN)
            async with asyncssh.connect(
                "127.0.0.1",
                port,
                username="tester",
                known_hosts=([host_key.convert_to_public()], [], []),
                client_keys=[keypair],
                agent_path=None,
            ) as connection:
                result = await connection.run("anything", check=True)
                return str(result.stdout)
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(asyncio.wait_for(run(), 60)) == "hello tester\n"
