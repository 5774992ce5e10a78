"""tpmsigner's own salted HMAC session (tpmsigner.tpmsession) against a real swtpm.

The key derivations are checked against tpm2-pytss's independent
implementation, and the session itself against swtpm, which rejects a
wrong HMAC and would sign a wrongly decrypted digest (the signature then
fails to verify).  The faults a real TPM does not produce (a tampered or
truncated response, TPM_RC_RETRY on demand) come from a transport that
changes swtpm's real responses.
"""

from __future__ import annotations

import hashlib
import os
import struct

import asyncssh
import pytest
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
from tpm2_pytss.internal.crypto import _kdfa as pytss_kdfa
from tpm2_pytss.internal.crypto import kdfe as pytss_kdfe
from tpm2_pytss.TCTILdr import TCTILdr
from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMT_PUBLIC

import tpmsigner
from tpmsigner import tpmsession
from tpmsigner.errors import TpmAuthError
from tpmsigner.templates import SRK_PERSISTENT_HANDLE, srk_ecc_p256_template
from tpmsigner.tpm import Tpm
from tpmsigner.tpmsession import TpmResponseError

PIN = b"pin-Session-4411"


@pytest.fixture
def store(tmp_path) -> tpmsigner.KeyStore:
    return tpmsigner.KeyStore(tmp_path / "home")


@pytest.mark.parametrize("bits", [128, 256, 384, 520])
def test_kdfa_matches_tpm2_pytss(bits: int) -> None:
    key, u, v = os.urandom(32), os.urandom(32), os.urandom(16)
    for label in (b"ATH", b"CFB"):
        ours = tpmsession.kdfa("sha256", key, label, u, v, bits)
        assert ours == pytss_kdfa(TPM2_ALG.SHA256, key, label, u, v, bits)
        assert len(ours) == bits // 8


@pytest.mark.parametrize(("hash_name", "alg"), [("sha256", TPM2_ALG.SHA256), ("sha384", TPM2_ALG.SHA384)])
def test_kdfe_matches_tpm2_pytss(hash_name: str, alg: int) -> None:
    z, u, v = os.urandom(32), os.urandom(32), os.urandom(32)
    ours = tpmsession.kdfe(hash_name, z, b"SECRET", u, v, 256)
    assert ours == pytss_kdfe(alg, z, b"SECRET\0", u, v, 256)


def test_kdf_rejects_partial_bytes() -> None:
    with pytest.raises(ValueError, match="whole bytes"):
        tpmsession.kdfa("sha256", b"k", b"ATH", b"", b"", 12)


def test_object_name_matches_the_tpm(swtpm, store) -> None:
    with Tpm(swtpm.tcti) as tpm:
        identity = tpmsigner.create_identity(tpm, store, "work", PIN)
    blob = store.key_blob(identity)

    esapi = ESAPI(TCTILdr.parse(swtpm.tcti))
    try:
        parent, _, _, _, _ = esapi.create_primary(
            TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=srk_ecc_p256_template()), ESYS_TR.RH_OWNER
        )
        from tpm2_pytss.types import TPM2B_PRIVATE

        key = esapi.load(parent, TPM2B_PRIVATE.unmarshal(blob.private)[0], TPM2B_PUBLIC.unmarshal(blob.public)[0])
        assert tpmsession.object_name(blob.public) == bytes(esapi.tr_get_name(key))
        esapi.flush_context(key)
        esapi.flush_context(parent)
    finally:
        esapi.close()


def test_object_name_rejects_unknown_name_algorithm() -> None:
    area = struct.pack(">HH", 0x0023, 0x0099) + bytes(20)
    with pytest.raises(tpmsigner.TpmError, match="name algorithm"):
        tpmsession.object_name(struct.pack(">H", len(area)) + area)


def _rsa_srk_template() -> TPMT_PUBLIC:
    return TPMT_PUBLIC.parse(
        "rsa2048:aes128cfb",
        objectAttributes="fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|decrypt|noda",
    )


def test_session_salted_to_an_rsa_storage_key(swtpm, store) -> None:
    # A TPM provisioned by other tools may hold an RSA SRK at 0x81000001;
    # the salt is then RSA-OAEP encrypted with the label "SECRET".
    esapi = ESAPI(TCTILdr.parse(swtpm.tcti))
    try:
        primary, _, _, _, _ = esapi.create_primary(
            TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=_rsa_srk_template()), ESYS_TR.RH_OWNER
        )
        esapi.evict_control(ESYS_TR.RH_OWNER, primary, SRK_PERSISTENT_HANDLE)
        esapi.flush_context(primary)
    finally:
        esapi.close()

    with Tpm(swtpm.tcti) as tpm:
        identity = tpmsigner.create_identity(tpm, store, "work", PIN)
        signatures = [tpmsigner.sign_data(tpm, store, identity, b"payload %d" % n, PIN) for n in range(3)]
        assert tpm._session is not None  # noqa: SLF001 - the session must be salted to the RSA key
    public_key = asyncssh.import_public_key(identity.openssh_line())
    for n, signature in enumerate(signatures):
        assert public_key.verify(b"payload %d" % n, signature)


def test_session_salted_to_a_p384_storage_key(swtpm, store) -> None:
    # A P-384 SRK with SHA-384 as its name algorithm makes a 48-byte salt
    # from KDFe with SHA-384, which swtpm must derive the same way.
    template = TPMT_PUBLIC.parse(
        "ecc384:aes256cfb",
        nameAlg="sha384",
        objectAttributes="fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|decrypt|noda",
    )
    esapi = ESAPI(TCTILdr.parse(swtpm.tcti))
    try:
        primary, _, _, _, _ = esapi.create_primary(
            TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=template), ESYS_TR.RH_OWNER
        )
        esapi.evict_control(ESYS_TR.RH_OWNER, primary, SRK_PERSISTENT_HANDLE)
        esapi.flush_context(primary)
    finally:
        esapi.close()

    with Tpm(swtpm.tcti) as tpm:
        identity = tpmsigner.create_identity(tpm, store, "work", PIN)
        signatures = [tpmsigner.sign_data(tpm, store, identity, b"payload %d" % n, PIN) for n in range(3)]
    assert store.key_blob(identity).parent == SRK_PERSISTENT_HANDLE
    public_key = asyncssh.import_public_key(identity.openssh_line())
    for n, signature in enumerate(signatures):
        assert public_key.verify(b"payload %d" % n, signature)


class ChangingTransport:
    """Passes commands to swtpm's TCTI and lets a test change swtpm's responses."""

    def __init__(self, tcti) -> None:
        self.tcti = tcti
        self.sent: list[bytes] = []
        self.change = None
        # Responses given in swtpm's place, without passing the command on.
        self.local_answers: list[bytes] = []
        self._answer: bytes | None = None

    def transmit(self, command: bytes) -> None:
        self.sent.append(command)
        if self.local_answers:
            self._answer = self.local_answers.pop(0)
        else:
            self.tcti.transmit(command)

    def receive(self, size: int = 4096, timeout: int = -1) -> bytes:
        if self._answer is not None:
            answer, self._answer = self._answer, None
            return answer
        response = self.tcti.receive(size, timeout)
        if self.change is not None:
            response = self.change(response)
        return response


@pytest.fixture
def session_on_swtpm(swtpm, store):
    """(Tpm, blob, transport): a key loaded by Tpm, and the Tpm's session reached through a ChangingTransport."""
    tpm = Tpm(swtpm.tcti)
    identity = tpmsigner.create_identity(tpm, store, "work", PIN)
    blob = store.key_blob(identity)
    tpmsigner.sign_data(tpm, store, identity, b"warm-up", PIN)
    yield tpm, blob, ChangingTransport(tpm._esapi.tcti)  # noqa: SLF001
    tpm.close()


def _verify(blob, digest: bytes, marshalled_signature: bytes) -> None:
    """Raise InvalidSignature unless the TPMT_SIGNATURE is the key's ECDSA signature of ``digest``."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, utils

    from tpmsigner.tpm import _raw_signature

    r, s = _raw_signature(marshalled_signature, TPM2_ALG.ECDSA)
    public = TPM2B_PUBLIC.unmarshal(blob.public)[0].publicArea
    key = serialization.load_pem_public_key(bytes(public.to_pem()))
    key.verify(utils.encode_dss_signature(r, s), digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def _sign(tpm: Tpm, blob, transport, digest: bytes, pin: bytes = PIN) -> bytes:
    from tpmsigner.tpm import _sign_parameters

    esapi = tpm._esapi  # noqa: SLF001
    key_handle = tpm._loaded.get(blob.parent, blob.public, blob.private)  # noqa: SLF001
    scheme, ticket = _sign_parameters(TPM2_ALG.ECDSA, TPM2_ALG.SHA256)
    return tpmsession.sign(
        transport,
        tpm._session,  # noqa: SLF001
        int(esapi.tr_get_tpm_handle(key_handle)),
        tpmsession.object_name(blob.public),
        pin,
        digest,
        scheme,
        ticket,
    )


def test_digest_travels_encrypted(session_on_swtpm) -> None:
    tpm, blob, transport = session_on_swtpm
    digest = hashlib.sha256(b"a message whose digest must not be seen").digest()
    signature = _sign(tpm, blob, transport, digest)

    (command,) = transport.sent
    assert struct.unpack_from(">I", command, 6)[0] == tpmsession.TPM_CC_SIGN
    assert digest not in command
    assert PIN not in command
    # The TPM signed the digest it decrypted, so CFB key and IV were right.
    _verify(blob, digest, signature)


def test_tampered_response_rejected_then_recovers(session_on_swtpm, store) -> None:
    tpm, blob, transport = session_on_swtpm

    def flip_signature_bit(response: bytes) -> bytes:
        changed = bytearray(response)
        changed[20] ^= 0x01   # inside the signature's r
        return bytes(changed)

    transport.change = flip_signature_bit
    with pytest.raises(TpmResponseError, match="HMAC check"):
        _sign(tpm, blob, transport, bytes(32))

    # Through Tpm: a rejected response drops the session, and the next
    # signature starts a new one and verifies.
    tpm._drop_session()  # noqa: SLF001 - what sign_digest does after TpmResponseError
    identity = store.list()[0]
    signature = tpmsigner.sign_data(tpm, store, identity, b"after", PIN)
    assert asyncssh.import_public_key(identity.openssh_line()).verify(b"after", signature)


def test_truncated_response_is_refused(session_on_swtpm) -> None:
    tpm, blob, transport = session_on_swtpm

    def truncate(response: bytes) -> bytes:
        cut = response[:-5]
        return cut[:2] + struct.pack(">I", len(cut)) + cut[6:]

    transport.change = truncate
    with pytest.raises(TpmResponseError, match="ends early"):
        _sign(tpm, blob, transport, bytes(32))


def test_size_field_must_match(session_on_swtpm) -> None:
    tpm, blob, transport = session_on_swtpm
    transport.change = lambda response: response + b"\0"
    with pytest.raises(TpmResponseError, match="size field"):
        _sign(tpm, blob, transport, bytes(32))


def test_retry_resends_the_same_command(session_on_swtpm) -> None:
    tpm, blob, transport = session_on_swtpm
    # TPM_RC_RETRY and TPM_RC_YIELDED: the TPM did not run the command.
    transport.local_answers = [
        struct.pack(">HII", tpmsession.TPM_ST_NO_SESSIONS, 10, code) for code in (0x922, 0x908)
    ]
    signature = _sign(tpm, blob, transport, bytes(32))
    _verify(blob, bytes(32), signature)
    assert len(transport.sent) == 3
    assert transport.sent[0] == transport.sent[1] == transport.sent[2]


def test_endless_retry_gives_up(session_on_swtpm) -> None:
    tpm, blob, transport = session_on_swtpm
    retry = struct.pack(">HII", tpmsession.TPM_ST_NO_SESSIONS, 10, 0x922)
    transport.local_answers = [retry] * tpmsession.MAX_RESENDS
    with pytest.raises(TSS2_Exception) as caught:
        _sign(tpm, blob, transport, bytes(32))
    assert int(caught.value.rc) == 0x922
    assert len(transport.sent) == tpmsession.MAX_RESENDS


def test_testing_resends_back_off(session_on_swtpm, monkeypatch) -> None:
    # TPM_RC_TESTING: the TPM runs its self-test, which takes a while, so
    # resends wait longer each time instead of spinning.
    tpm, blob, transport = session_on_swtpm
    delays: list[float] = []
    monkeypatch.setattr(tpmsession.time, "sleep", delays.append)
    testing = struct.pack(">HII", tpmsession.TPM_ST_NO_SESSIONS, 10, 0x90A)
    transport.local_answers = [testing] * tpmsession.MAX_RESENDS
    with pytest.raises(TSS2_Exception) as caught:
        _sign(tpm, blob, transport, bytes(32))
    assert int(caught.value.rc) == 0x90A
    assert len(delays) == tpmsession.MAX_RESENDS - 1
    assert delays[0] == tpmsession.RESEND_DELAY_FIRST_SECONDS
    assert all(later >= earlier for earlier, later in zip(delays, delays[1:]))
    assert max(delays) == tpmsession.RESEND_DELAY_MAX_SECONDS
    assert sum(delays) > 0.5


def test_wrong_pin_is_auth_failure(session_on_swtpm, store) -> None:
    tpm, blob, transport = session_on_swtpm
    with pytest.raises(TSS2_Exception) as caught:
        _sign(tpm, blob, transport, bytes(32), pin=b"wrong-pin")
    assert int(caught.value.rc) & 0xBF == 0x8E   # TPM_RC_AUTH_FAIL, format 1

    # Through Tpm it is a TpmAuthError naming the tries left, never the PIN.
    tpm._drop_session()  # noqa: SLF001 - the nonces moved out of step
    identity = store.list()[0]
    with pytest.raises(TpmAuthError, match="tries left") as caught_auth:
        tpmsigner.sign_data(tpm, store, identity, b"x", b"wrong-pin-2")
    assert b"wrong-pin-2".decode() not in str(caught_auth.value)


def test_pin_trailing_zero_bytes_ignored(swtpm, store) -> None:
    with Tpm(swtpm.tcti) as tpm:
        identity = tpmsigner.create_identity(tpm, store, "work", b"pin-with-zero\0")
        signature = tpmsigner.sign_data(tpm, store, identity, b"payload", b"pin-with-zero\0")
        assert asyncssh.import_public_key(identity.openssh_line()).verify(b"payload", signature)


@pytest.mark.parametrize("zero_pin", [b"\0", b"\0\0\0\0"])
def test_pin_of_zero_bytes_rejected(swtpm, store, zero_pin: bytes) -> None:
    # The TPM drops trailing zero bytes, so such a PIN would leave the key
    # with an empty authValue that any local process can sign with.
    with Tpm(swtpm.tcti) as tpm:
        with pytest.raises(ValueError, match="zero bytes"):
            tpmsigner.create_identity(tpm, store, "zero", zero_pin)
        assert store.list() == []

        identity = tpmsigner.create_identity(tpm, store, "work", PIN)
        with pytest.raises(ValueError, match="zero bytes"):
            tpm.change_pin(store.key_blob(identity), PIN, zero_pin)
        signature = tpmsigner.sign_data(tpm, store, identity, b"payload", PIN)
    assert asyncssh.import_public_key(identity.openssh_line()).verify(b"payload", signature)
