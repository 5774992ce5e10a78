"""Create identities and sign with them: the operations behind the CLI and the signer."""

from __future__ import annotations

from .errors import TpmError
from .keytypes import DEFAULT_KEY_TYPE, KeyType
from .protocol.sshkeys import (
    EcdsaPublicKey,
    digest_for_signing,
    encode_ecdsa_signature,
    encode_rsa_signature,
    signature_scheme,
    verify_signature,
)
from .store import Identity, KeyStore, validate_label
from .tpm import Tpm


def create_identity(
    tpm: Tpm, store: KeyStore, label: str, pin: bytes, key_type: KeyType = DEFAULT_KEY_TYPE
) -> Identity:
    """Create a key in the TPM and store it as identity ``label``.

    The label is checked, and an existing identity of that name rejected,
    before the TPM is asked for anything.
    """
    validate_label(label)
    store.ensure_label_free(label)
    blob = tpm.create_key(pin, key_type)
    return store.add(label, blob)


def sign_data(tpm: Tpm, store: KeyStore, identity: Identity, data: bytes, pin: bytes, flags: int = 0) -> bytes:
    """Sign ``data`` with ``identity`` in the TPM and return an SSH signature blob.

    ``flags`` are the ssh-agent signature flags: for RSA keys they choose
    rsa-sha2-256, rsa-sha2-512 or ssh-rsa, and ECDSA keys ignore them.  The
    TPM's signature is verified against the stored public key before it is
    returned, so a faulty TPM or a swapped key file never yields a signature
    that does not match the listed key.
    """
    public_key = identity.public_key
    scheme = signature_scheme(public_key, flags)
    blob = store.key_blob(identity)
    raw = tpm.sign_digest(blob, digest_for_signing(public_key, data, flags), pin, scheme.hash_name)

    if isinstance(public_key, EcdsaPublicKey):
        assert isinstance(raw, tuple)
        signature = encode_ecdsa_signature(public_key, *raw)
    else:
        assert isinstance(raw, bytes)
        signature = encode_rsa_signature(public_key, scheme, raw)

    if not verify_signature(public_key, data, signature):
        raise TpmError(f"the TPM's signature does not verify with the public key of {identity.label!r}")
    return signature
