"""The floor: TPM2_Sign alone, as fast as tpm2-pytss can ask for it.

One ESAPI context, the storage key created once, the signing key loaded
once, and one salted HMAC session with parameter encryption kept open
(TPM 2.0 Library Part 1, sections 19.6.11 and 21), exactly the protection
tpmsigner gives a PIN.  Only ``esapi.sign`` is timed; nothing that a
signer must do around it (reading the key file, asking for approval,
answering a client) is counted.
"""

from __future__ import annotations

import hashlib
import time

from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RH, TPM2_SE, TPM2_ST, TPMA_SESSION
from tpm2_pytss.TCTILdr import TCTILdr
from tpm2_pytss.types import (
    TPM2B_DATA,
    TPM2B_DIGEST,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_PCR_SELECTION,
    TPMS_SCHEME_HASH,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMT_TK_HASHCHECK,
    TPMU_SIG_SCHEME,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from tpmsigner.protocol.sshkeys import EcdsaPublicKey, encode_ecdsa_signature
from tpmsigner.templates import srk_ecc_p256_template
from tpmsigner import tpmsession
from tpmsigner.tpm import PARENT_OWNER, TpmKeyBlob, _raw_signature


ENCRYPTED_SESSION = "salted HMAC session with parameter encryption"
HMAC_SESSION = "salted HMAC session"
PASSWORD = "password"
OWN_SESSION = "the same session computed by tpmsigner.tpmsession, as the signer does"
AUTHORIZATIONS = (PASSWORD, HMAC_SESSION, ENCRYPTED_SESSION, OWN_SESSION)


class FloorSigner:
    """TPM2_Sign on a loaded ECDSA P-256 key inside a kept-open salted session."""

    def __init__(self, tcti: str, blob: TpmKeyBlob, public_key: EcdsaPublicKey, pin: bytes) -> None:
        if blob.parent != PARENT_OWNER:
            raise ValueError("the floor recreates the owner-hierarchy storage key; the key must be its child")
        self.public_key = public_key
        self._esapi = ESAPI(TCTILdr.parse(tcti))
        esapi = self._esapi
        self._parent, parent_public, _, _, _ = esapi.create_primary(
            TPM2B_SENSITIVE_CREATE(),
            TPM2B_PUBLIC(publicArea=srk_ecc_p256_template()),
            ESYS_TR.RH_OWNER,
            TPM2B_DATA(),
            TPML_PCR_SELECTION(),
        )
        self._session = esapi.start_auth_session(
            tpm_key=self._parent,
            bind=ESYS_TR.NONE,
            session_type=TPM2_SE.HMAC,
            symmetric=TPMT_SYM_DEF(
                algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128), mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB)
            ),
            auth_hash=TPM2_ALG.SHA256,
        )
        esapi.trsess_set_attributes(self._session, TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.DECRYPT)
        public, _ = TPM2B_PUBLIC.unmarshal(blob.public)
        private, _ = TPM2B_PRIVATE.unmarshal(blob.private)
        self._key = esapi.load(self._parent, private, public, session1=self._session)
        esapi.tr_set_auth(self._key, pin)
        self._scheme = TPMT_SIG_SCHEME(
            scheme=TPM2_ALG.ECDSA, details=TPMU_SIG_SCHEME(ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256))
        )
        self._ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)

        # tpmsigner's own session code on the same key, for OWN_SESSION.
        self._own_session = tpmsession.start_salted_session(
            esapi.tcti,
            int(esapi.tr_get_tpm_handle(self._parent)),
            tpmsession.salt_key_from_public(parent_public.publicArea),
        )
        self._key_tpm_handle = int(esapi.tr_get_tpm_handle(self._key))
        self._key_name = tpmsession.object_name(blob.public)
        self._pin = pin
        self._marshalled_scheme = bytes(self._scheme.marshal())
        self._marshalled_ticket = bytes(self._ticket.marshal())

    def sign(self, data: bytes, authorization: str = ENCRYPTED_SESSION) -> tuple[bytes, float]:
        """Return the SSH signature blob of ``data`` and the seconds TPM2_Sign took.

        ``authorization`` is the floor's own session (ENCRYPTED_SESSION), the
        same session without parameter encryption (HMAC_SESSION), the PIN
        sent as a plain password (PASSWORD), which tpmsigner never does, or
        the encrypted session computed by tpmsigner.tpmsession instead of
        ESAPI (OWN_SESSION).  All but the first show what the session costs.
        """
        if authorization == OWN_SESSION:
            return self._sign_own_session(data)
        digest = TPM2B_DIGEST(hashlib.sha256(data).digest())
        if authorization == PASSWORD:
            session = ESYS_TR.PASSWORD
        else:
            session = self._session
            attributes = TPMA_SESSION.CONTINUESESSION
            if authorization == ENCRYPTED_SESSION:
                attributes |= TPMA_SESSION.DECRYPT
            self._esapi.trsess_set_attributes(session, attributes)
        started = time.perf_counter()
        signature = self._esapi.sign(self._key, digest, self._scheme, self._ticket, session1=session)
        elapsed = time.perf_counter() - started
        r = int.from_bytes(bytes(signature.signature.ecdsa.signatureR.buffer), "big")
        s = int.from_bytes(bytes(signature.signature.ecdsa.signatureS.buffer), "big")
        return encode_ecdsa_signature(self.public_key, r, s), elapsed

    def _sign_own_session(self, data: bytes) -> tuple[bytes, float]:
        digest = hashlib.sha256(data).digest()
        started = time.perf_counter()
        marshalled = tpmsession.sign(
            self._esapi.tcti,
            self._own_session,
            self._key_tpm_handle,
            self._key_name,
            self._pin,
            digest,
            self._marshalled_scheme,
            self._marshalled_ticket,
        )
        elapsed = time.perf_counter() - started
        r, s = _raw_signature(marshalled, TPM2_ALG.ECDSA)
        return encode_ecdsa_signature(self.public_key, r, s), elapsed

    def close(self) -> None:
        """Flush the key, the sessions and the storage key: swtpm has three object slots."""
        tpmsession.flush(self._esapi.tcti, self._own_session.handle)
        for handle in (self._key, self._session, self._parent):
            self._esapi.flush_context(handle)
        self._esapi.close()
