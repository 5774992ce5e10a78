"""TPM object templates (TPM 2.0 Library Part 2, section 12.2.4 TPMT_PUBLIC).

Each function builds a new template, so no caller can change a template
that another caller is about to use.
"""

from __future__ import annotations

from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPMA_OBJECT
from tpm2_pytss.types import (
    TPMS_ECC_PARMS,
    TPMS_RSA_PARMS,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_RSA_SCHEME,
    TPMT_SYM_DEF_OBJECT,
    TPMU_PUBLIC_PARMS,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

# The storage root key's persistent handle in the TCG provisioning guidance
# (TCG TPM v2.0 Provisioning Guidance, section 7.8: 0x81000001).
SRK_PERSISTENT_HANDLE = 0x81000001

# Attributes every signing key must carry.  Checked again on each load.
SIGNING_KEY_REQUIRED = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.SIGN_ENCRYPT
)

# Attributes a signing key must not carry: DECRYPT would make the key usable
# for TPM2_RSA_Decrypt/ECDH, NODA would exempt the PIN from the dictionary
# attack counter, RESTRICTED would stop it signing outside data.
SIGNING_KEY_FORBIDDEN = TPMA_OBJECT.DECRYPT | TPMA_OBJECT.NODA | TPMA_OBJECT.RESTRICTED


def srk_ecc_p256_template() -> TPMT_PUBLIC:
    """Return the ECC NIST P-256 storage key template H-2.

    TCG EK Credential Profile 2.5, B.4.5, as the TCG provisioning guidance
    section 7.5.1 uses it for the storage root key: the "H" template has an
    empty unique field.  The TSS2 PRIVATE KEY format says a key whose parent
    is TPM2_RH_OWNER lives under exactly this primary, so every tool that
    reads the format derives the same parent from the owner seed.
    """
    return TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=(
            TPMA_OBJECT.FIXEDTPM
            | TPMA_OBJECT.FIXEDPARENT
            | TPMA_OBJECT.SENSITIVEDATAORIGIN
            | TPMA_OBJECT.USERWITHAUTH
            | TPMA_OBJECT.NODA
            | TPMA_OBJECT.RESTRICTED
            | TPMA_OBJECT.DECRYPT
        ),
        authPolicy=b"",
        parameters=TPMU_PUBLIC_PARMS(
            eccDetail=TPMS_ECC_PARMS(
                symmetric=TPMT_SYM_DEF_OBJECT(
                    algorithm=TPM2_ALG.AES,
                    keyBits=TPMU_SYM_KEY_BITS(aes=128),
                    mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
                ),
                scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
                curveID=TPM2_ECC.NIST_P256,
                kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
            ),
        ),
    )


def ecc_signing_key_template(curve_id: int = TPM2_ECC.NIST_P256) -> TPMT_PUBLIC:
    """Return a template for an ECDSA signing key that needs its PIN.

    Unlike tpm2-pytss's ``TSSPrivKey.create_ecc`` template, this one leaves
    NODA clear, so every wrong PIN counts toward the TPM's dictionary-attack
    lockout (TPM 2.0 Library Part 1, section 19.8.6).  The scheme stays NULL
    so that other TSS2 key-file consumers may pick the hash at sign time.
    """
    return TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=SIGNING_KEY_REQUIRED,
        authPolicy=b"",
        parameters=TPMU_PUBLIC_PARMS(
            eccDetail=TPMS_ECC_PARMS(
                symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
                curveID=curve_id,
                kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
            ),
        ),
    )


def rsa_signing_key_template(bits: int) -> TPMT_PUBLIC:
    """Return a template for an RSA signing key that needs its PIN.

    Sign only, without DECRYPT: an RSA key that may also decrypt would let
    anyone with the PIN use it as a decryption oracle.  The exponent 0 means
    the TPM default, 65537 (TPM 2.0 Library Part 2, section 12.2.3.5).
    """
    return TPMT_PUBLIC(
        type=TPM2_ALG.RSA,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=SIGNING_KEY_REQUIRED,
        authPolicy=b"",
        parameters=TPMU_PUBLIC_PARMS(
            rsaDetail=TPMS_RSA_PARMS(
                symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                scheme=TPMT_RSA_SCHEME(scheme=TPM2_ALG.NULL),
                keyBits=bits,
                exponent=0,
            ),
        ),
    )
