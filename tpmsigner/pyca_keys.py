"""TPM keys as pyca/cryptography private key objects.

Code that takes an ``ec.EllipticCurvePrivateKey`` or an ``rsa.RSAPrivateKey``
and only calls ``sign`` and ``public_key`` can sign inside the TPM with
these.  The private key never leaves the TPM, so everything that would
reveal it (``private_numbers``, ``private_bytes``) raises, and RSA keys
refuse ``decrypt``: they are sign-only TPM objects.

The PIN comes from a callback on every signature; nothing caches it.
"""

from __future__ import annotations

import copy
from typing import Callable

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from .protocol.sshkeys import EcdsaPublicKey, RsaPublicKey
from .store import Identity, KeyStore
from .tpm import Tpm

PinCallback = Callable[[], bytes | str]

# Hashes the TPM signs with, by pyca name; see Tpm.sign_digest.
_SUPPORTED_HASHES = {"sha1", "sha256", "sha384", "sha512"}


def _pin_bytes(callback: PinCallback) -> bytes:
    pin = callback()
    return pin.encode("utf-8") if isinstance(pin, str) else pin


def _digest(data: bytes, algorithm: hashes.HashAlgorithm | Prehashed) -> tuple[bytes, str]:
    """Return (digest, hash name) for ``data``, which is already a digest when Prehashed."""
    if isinstance(algorithm, Prehashed):
        hash_algorithm = algorithm._algorithm  # noqa: SLF001 - pyca exposes no public accessor
        digest = data
        if len(digest) != hash_algorithm.digest_size:
            raise ValueError(f"the prehashed digest is {len(digest)} bytes; {hash_algorithm.name} has {hash_algorithm.digest_size}")
    else:
        hash_algorithm = algorithm
        hasher = hashes.Hash(algorithm)
        hasher.update(data)
        digest = hasher.finalize()
    if hash_algorithm.name not in _SUPPORTED_HASHES:
        raise UnsupportedAlgorithm(f"the TPM signs with SHA-1 or SHA-2 digests only, not {hash_algorithm.name}")
    return digest, hash_algorithm.name


class _TpmKeyBase:
    def __init__(self, tpm: Tpm, store: KeyStore, identity: Identity, pin_callback: PinCallback) -> None:
        self._tpm = tpm
        self._store = store
        self._identity = identity
        self._pin_callback = pin_callback

    @property
    def identity(self) -> Identity:
        return self._identity

    def _sign_digest(self, digest: bytes, hash_name: str):
        blob = self._store.key_blob(self._identity)
        return self._tpm.sign_digest(blob, digest, _pin_bytes(self._pin_callback), hash_name)

    def private_bytes(self, *args: object, **kwargs: object) -> bytes:
        raise UnsupportedAlgorithm("the private key is inside the TPM and cannot be exported")

    def private_numbers(self):
        raise UnsupportedAlgorithm("the private key is inside the TPM and cannot be exported")

    def __copy__(self):
        return self

    def __deepcopy__(self, memo: dict) -> object:
        return copy.copy(self)


class TpmEllipticCurvePrivateKey(_TpmKeyBase, ec.EllipticCurvePrivateKey):
    """An ECDSA key in the TPM, usable where pyca expects an EC private key."""

    def __init__(self, tpm: Tpm, store: KeyStore, identity: Identity, pin_callback: PinCallback) -> None:
        public_key = identity.public_key
        if not isinstance(public_key, EcdsaPublicKey):
            raise TypeError(f"identity {identity.label!r} is not an ECDSA key")
        super().__init__(tpm, store, identity, pin_callback)
        self._public_key = public_key.to_cryptography()

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public_key.curve

    @property
    def key_size(self) -> int:
        return self._public_key.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    def exchange(self, algorithm, peer_public_key) -> bytes:
        raise UnsupportedAlgorithm("TPM keys made by tpmsigner are sign-only; ECDH is not allowed")

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """Sign in the TPM; return a DER signature, as pyca's own keys do."""
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise UnsupportedAlgorithm("only ECDSA signatures are supported")
        digest, hash_name = _digest(data, signature_algorithm.algorithm)
        r, s = self._sign_digest(digest, hash_name)
        return encode_dss_signature(r, s)


class TpmRsaPrivateKey(_TpmKeyBase, rsa.RSAPrivateKey):
    """An RSA key in the TPM that signs with PKCS#1 v1.5 and never decrypts."""

    def __init__(self, tpm: Tpm, store: KeyStore, identity: Identity, pin_callback: PinCallback) -> None:
        public_key = identity.public_key
        if not isinstance(public_key, RsaPublicKey):
            raise TypeError(f"identity {identity.label!r} is not an RSA key")
        super().__init__(tpm, store, identity, pin_callback)
        self._public_key = public_key.to_cryptography()

    @property
    def key_size(self) -> int:
        return self._public_key.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public_key

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        raise UnsupportedAlgorithm("TPM keys made by tpmsigner are sign-only; decryption is not allowed")

    def sign(self, data: bytes, padding: padding.AsymmetricPadding, algorithm) -> bytes:
        """Sign in the TPM with RSASSA-PKCS1-v1_5."""
        if not isinstance(padding, _PKCS1v15):
            raise UnsupportedAlgorithm("TPM RSA keys sign with PKCS1v15 padding only")
        digest, hash_name = _digest(data, algorithm)
        return self._sign_digest(digest, hash_name)


_PKCS1v15 = padding.PKCS1v15


def private_key_for(
    tpm: Tpm, store: KeyStore, identity: Identity, pin_callback: PinCallback
) -> TpmEllipticCurvePrivateKey | TpmRsaPrivateKey:
    """Return the pyca private key object for ``identity``."""
    if isinstance(identity.public_key, EcdsaPublicKey):
        return TpmEllipticCurvePrivateKey(tpm, store, identity, pin_callback)
    return TpmRsaPrivateKey(tpm, store, identity, pin_callback)
