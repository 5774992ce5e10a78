"""Create identities and sign with them: the operations behind the CLI and the signer."""

from __future__ import annotations

from .errors import TpmError
from .protocol.sshkeys import NISTP256, EcdsaCurve, digest_for_signing, encode_ecdsa_signature, verify_ecdsa_signature
from .store import Identity, KeyStore, validate_label
from .tpm import Tpm


def create_identity(tpm: Tpm, store: KeyStore, label: str, pin: bytes, curve: EcdsaCurve = NISTP256) -> Identity:
    """Create an ECDSA key in the TPM and store it as identity ``label``.

    The label is checked, and an existing identity of that name rejected,
    before the TPM is asked for anything.
    """
    validate_label(label)
    store.ensure_label_free(label)
    blob = tpm.create_ecdsa_key(pin, curve)
    return store.add(label, blob)


def sign_data(tpm: Tpm, store: KeyStore, identity: Identity, data: bytes, pin: bytes) -> bytes:
    """Sign ``data`` with ``identity`` in the TPM and return an SSH signature blob.

    The hash is chosen by the key's curve (RFC 5656 section 6.2.1).  The
    TPM's signature is verified against the stored public key before it is
    returned, so a faulty TPM or a swapped key file never yields a signature
    that does not match the listed key.
    """
    public_key = identity.public_key
    blob = store.key_blob(identity)
    r, s = tpm.sign_digest(blob, digest_for_signing(public_key, data), pin)
    signature = encode_ecdsa_signature(public_key, r, s)
    if not verify_ecdsa_signature(public_key, data, signature):
        raise TpmError(f"the TPM's signature does not verify with the public key of {identity.label!r}")
    return signature
