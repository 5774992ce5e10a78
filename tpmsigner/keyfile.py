"""The ``TSS2 PRIVATE KEY`` PEM format (draft-bottomley-tpm2-keys).

Reading and writing go through tpm2-pytss's ``TSSPrivKey``, so the files
are the ones tpm2-openssl, tpm2-tss-engine and ssh-tpm-agent exchange.
"""

from __future__ import annotations

from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import TPM2B_PRIVATE, TPM2B_PUBLIC

from .errors import KeyFileError
from .tpm import TpmKeyBlob

PEM_HEADER = b"-----BEGIN TSS2 PRIVATE KEY-----"


def encode_key_file(blob: TpmKeyBlob) -> bytes:
    """Return the PEM text of a wrapped key whose use needs a PIN."""
    public, _ = TPM2B_PUBLIC.unmarshal(blob.public)
    private, _ = TPM2B_PRIVATE.unmarshal(blob.private)
    return TSSPrivKey(private, public, empty_auth=False, parent=blob.parent).to_pem()


def decode_key_file(pem: bytes, source: str = "key file") -> TpmKeyBlob:
    """Parse PEM text into a TpmKeyBlob; ``source`` names the file in errors."""
    if PEM_HEADER not in pem:
        raise KeyFileError(f"{source} is not a TSS2 PRIVATE KEY PEM file")
    try:
        key = TSSPrivKey.from_pem(pem)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{source} is not a valid TSS2 PRIVATE KEY: {exc}") from None

    if key.empty_auth:
        raise KeyFileError(
            f"{source} is a key with an empty authorisation value; tpmsigner only "
            "uses keys that need a PIN for every signature"
        )
    return TpmKeyBlob(
        public=bytes(key.public.marshal()),
        private=bytes(key.private.marshal()),
        parent=int(key.parent),
    )
