"""tpmsigner's own salted HMAC session for TPM2_Sign, computed in Python.

Every signature sends a PIN-keyed HMAC and an encrypted digest.  The
tss2-esys in Debian 12 (3.2.1) creates a new OpenSSL library context for
every hash and HMAC it computes (src/tss2-esys/esys_crypto_ossl.c), and
OpenSSL 3.0 then fetches its algorithms anew each time.  Measured with perf
on swtpm, that costs about 2 ms of client CPU per TPM2_Sign, four times
what swtpm spends on the ECDSA signature.  This module computes the same
session with hashlib, hmac and pyca/cryptography in about 0.05 ms.

Only the commands of the signing path are sent this way:
TPM2_StartAuthSession (salted, no bind), TPM2_Sign and TPM2_FlushContext.
They go through the TCTI of ``Tpm``'s one ESAPI context, under its lock.
Everything else (creating and loading keys, reading properties) still goes
through ESAPI.

The computations follow TPM 2.0 Library Part 1:

- KDFa and KDFe, section 11.4.10;
- the salt, encrypted to the storage key, and the session key made from it,
  sections 19.6.11 and 19.6.8 (ECDH with KDFe and the label "SECRET" for
  an ECC key, RSA-OAEP with the same label for an RSA key);
- cpHash, rpHash and the command and response HMACs, sections 18.7, 18.8
  and 19.6.5;
- AES-CFB encryption of the first command parameter (TPM2_Sign's digest),
  section 21.3.

A response whose HMAC does not verify is rejected, because it did not come
from the TPM that has the storage key, or it was changed on the way.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:
    # pyca/cryptography 47 and later keep CFB among the "decrepit" modes.
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older pyca/cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import TPM2_HT, TSS2_RC
from tpm2_pytss.types import TPMT_PUBLIC

from .errors import TpmError

logger = logging.getLogger(__name__)

# TPM 2.0 Library Part 2, section 6: the constants used here.
TPM_ST_NO_SESSIONS = 0x8001
TPM_ST_SESSIONS = 0x8002
TPM_CC_START_AUTH_SESSION = 0x00000176
TPM_CC_SIGN = 0x0000015D
TPM_CC_FLUSH_CONTEXT = 0x00000165
TPM_RH_NULL = 0x40000007
TPM_SE_HMAC = 0x00
TPM_ALG_RSA = 0x0001
TPM_ALG_AES = 0x0006
TPM_ALG_ECC = 0x0023
TPM_ALG_CFB = 0x0043
TPM_ALG_SHA256 = 0x000B

# TPMA_SESSION: continueSession keeps the session after the command, and
# decrypt makes the first command parameter travel encrypted.
SESSION_CONTINUE = 0x01
SESSION_DECRYPT = 0x20
SIGN_SESSION_ATTRIBUTES = SESSION_CONTINUE | SESSION_DECRYPT

# Response codes after which the TPM did not run the command and expects
# the same bytes again (Part 2, section 6.6): TPM_RC_YIELDED, TPM_RC_TESTING
# and TPM_RC_RETRY.
_RESEND_CODES = frozenset({0x908, 0x90A, 0x922})
MAX_RESENDS = 16
# Resends wait 1 ms, then twice as long each time up to 100 ms, so that a
# TPM still running its self-test (TPM_RC_TESTING) gets about 0.9 seconds
# across MAX_RESENDS attempts before the error is raised.
RESEND_DELAY_FIRST_SECONDS = 0.001
RESEND_DELAY_MAX_SECONDS = 0.1

# The buffer for one response.  An RSA-4096 signature with its session area
# is about 600 bytes, and swtpm's maximum response size is 4096.
RESPONSE_BUFFER_BYTES = 4096
# The tss2 swtpm and mssim TCTIs keep a response that did not fit the buffer
# and reject every new command until it is read.  So a longer response is
# read again with this buffer, and its parser then rejects the extra bytes.
LONG_RESPONSE_BUFFER_BYTES = 1 << 20

# Part 2, section 11.1.3 (TPM_ALG_ID for hashes) and the hashlib names.
_HASH_NAMES = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512"}
_SESSION_HASH = "sha256"
_SESSION_AES_BITS = 128
_CURVE_NAMES = frozenset({"secp256r1", "secp384r1"})
_CRYPTOGRAPHY_HASHES = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
SECRET_LABEL = b"SECRET"


class TpmResponseError(TpmError):
    """A TPM response was malformed or failed its HMAC check."""


class Transport(Protocol):
    """The two calls of a TSS2 TCTI that this module uses (tpm2_pytss.TCTI)."""

    def transmit(self, command: bytes) -> None: ...

    def receive(self, size: int = ..., timeout: int = ...) -> bytes: ...


# ---- key derivation (Part 1, section 11.4.10) -------------------------------


def kdfa(hash_name: str, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """KDFa: SP 800-108 counter mode with HMAC, as the TPM uses it (Part 1, section 11.4.10.2)."""
    if bits % 8:
        raise ValueError("only whole bytes are derived here")
    output = b""
    counter = 1
    while len(output) * 8 < bits:
        message = struct.pack(">I", counter) + label + b"\0" + context_u + context_v + struct.pack(">I", bits)
        output += hmac.digest(key, message, hash_name)
        counter += 1
    return output[: bits // 8]


def kdfe(hash_name: str, z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """KDFe: SP 800-56A concatenation KDF, as the TPM uses it (Part 1, section 11.4.10.3)."""
    if bits % 8:
        raise ValueError("only whole bytes are derived here")
    output = b""
    counter = 1
    while len(output) * 8 < bits:
        output += hashlib.new(hash_name, struct.pack(">I", counter) + z + label + b"\0" + party_u + party_v).digest()
        counter += 1
    return output[: bits // 8]


def object_name(marshalled_public: bytes) -> bytes:
    """Return the TPM name of an object from its marshalled TPM2B_PUBLIC: nameAlg || H(publicArea)."""
    reader = _Reader(marshalled_public, "public area")
    area = reader.sized()
    reader.end()
    name_alg = struct.unpack_from(">H", area, 2)[0] if len(area) >= 4 else None
    hash_name = _HASH_NAMES.get(name_alg) if name_alg is not None else None
    if hash_name is None:
        raise TpmError(f"cannot compute the name of an object whose name algorithm is {name_alg!r}")
    return struct.pack(">H", name_alg) + hashlib.new(hash_name, area).digest()


def _strip_trailing_zeros(auth_value: bytes) -> bytes:
    # The TPM drops trailing zero bytes from an authValue before using it
    # as an HMAC key (Part 1, "Authorization Size Convention"), so the
    # caller must drop them too.
    return auth_value.rstrip(b"\0")


# ---- marshalling -----------------------------------------------------------


def _sized(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


class _Reader:
    """Bounds-checked reads from a TPM response.  A short read raises TpmResponseError."""

    def __init__(self, data: bytes, description: str) -> None:
        self.data = data
        self.offset = 0
        self.description = description

    def take(self, count: int) -> bytes:
        if self.offset + count > len(self.data):
            raise TpmResponseError(f"the TPM's {self.description} ends early ({len(self.data)} bytes)")
        chunk = self.data[self.offset : self.offset + count]
        self.offset += count
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def sized(self) -> bytes:
        return self.take(struct.unpack(">H", self.take(2))[0])

    def end(self) -> None:
        if self.offset != len(self.data):
            raise TpmResponseError(
                f"the TPM's {self.description} has {len(self.data) - self.offset} bytes after its last field"
            )


def _command(tag: int, code: int, body: bytes) -> bytes:
    return struct.pack(">HII", tag, 10 + len(body), code) + body


def execute(transport: Transport, command: bytes) -> tuple[int, bytes]:
    """Send ``command`` and return (response tag, bytes after the header).

    A TPM error code raises TSS2_Exception with that code, as ESAPI would,
    so ``Tpm`` translates both the same way.  TPM_RC_RETRY, TPM_RC_YIELDED
    and TPM_RC_TESTING resend the same bytes: the TPM did not run the
    command, so no nonce moved and no PIN was checked.
    """
    delay = 0.0
    for _ in range(MAX_RESENDS):
        if delay:
            time.sleep(delay)
        transport.transmit(command)
        response = _receive(transport)
        reader = _Reader(response, "response header")
        tag = struct.unpack(">H", reader.take(2))[0]
        size = reader.u32()
        code = reader.u32()
        if size != len(response):
            raise TpmResponseError(
                f"invalid TPM response: its size field is {size} bytes but {len(response)} bytes arrived"
            )
        if code in _RESEND_CODES:
            delay = min(RESEND_DELAY_MAX_SECONDS, delay * 2) if delay else RESEND_DELAY_FIRST_SECONDS
            continue
        if code != 0:
            raise TSS2_Exception(code)
        return tag, response[10:]
    raise TSS2_Exception(code)


def _receive(transport: Transport) -> bytes:
    """Return one whole response, even one longer than RESPONSE_BUFFER_BYTES."""
    try:
        return transport.receive(RESPONSE_BUFFER_BYTES, -1)
    except TSS2_Exception as exc:
        if int(exc.rc) != TSS2_RC.TCTI_RC_INSUFFICIENT_BUFFER:
            raise

    # NOTE: a response longer than LONG_RESPONSE_BUFFER_BYTES fails this
    # read too and leaves the TCTI unusable, so Tpm cannot flush its
    # handles before it opens a new context.
    return transport.receive(LONG_RESPONSE_BUFFER_BYTES, -1)


# ---- the session -----------------------------------------------------------


@dataclass
class SaltedSession:
    """A salted, unbound HMAC session with AES-128-CFB parameter encryption and SHA-256."""

    handle: int
    session_key: bytes = field(repr=False)
    nonce_tpm: bytes = field(repr=False)


@dataclass(frozen=True)
class SaltKey:
    """The public part of the storage key a session's salt is encrypted to."""

    algorithm: int          # TPM_ALG_ECC or TPM_ALG_RSA
    name_alg: int
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def salt_key_from_public(public: TPMT_PUBLIC) -> SaltKey:
    """Return the salt key of a storage key's public area (TPMT_PUBLIC, Part 2, section 12.2.4)."""
    name_alg = int(public.nameAlg)
    if name_alg not in _HASH_NAMES:
        raise TpmError(f"the storage key's name algorithm 0x{name_alg:04x} is not supported")
    try:
        public_key = serialization.load_pem_public_key(bytes(public.to_pem()))
    except (ValueError, TypeError) as exc:
        raise TpmError(f"cannot read the storage key's public key: {exc}") from None
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in _CURVE_NAMES:
            raise TpmError(f"the storage key is on curve {public_key.curve.name}, which tpmsigner does not salt to")
        return SaltKey(TPM_ALG_ECC, name_alg, public_key)
    if isinstance(public_key, rsa.RSAPublicKey):
        return SaltKey(TPM_ALG_RSA, name_alg, public_key)
    raise TpmError("the storage key is neither an ECC nor an RSA key")


def _encrypted_salt(salt_key: SaltKey) -> tuple[bytes, bytes]:
    """Return (salt, encrypted salt) for a session salted to ``salt_key`` (Part 1, section 19.6.11)."""
    hash_name = _HASH_NAMES[salt_key.name_alg]
    bits = hashlib.new(hash_name).digest_size * 8
    public_key = salt_key.public_key

    if isinstance(public_key, rsa.RSAPublicKey):
        salt = os.urandom(bits // 8)
        algorithm = _CRYPTOGRAPHY_HASHES[hash_name]()
        encrypted = public_key.encrypt(
            salt, padding.OAEP(mgf=padding.MGF1(algorithm), algorithm=algorithm, label=SECRET_LABEL + b"\0")
        )
        return salt, encrypted

    # One-pass Diffie-Hellman: an ephemeral key on the storage key's curve;
    # the shared x coordinate goes through KDFe with both x coordinates.
    ephemeral = ec.generate_private_key(public_key.curve)
    z = ephemeral.exchange(ec.ECDH(), public_key)
    size = (public_key.curve.key_size + 7) // 8
    ours = ephemeral.public_key().public_numbers()
    our_x, our_y = ours.x.to_bytes(size, "big"), ours.y.to_bytes(size, "big")
    their_x = public_key.public_numbers().x.to_bytes(size, "big")
    salt = kdfe(hash_name, z, SECRET_LABEL, our_x, their_x, bits)
    return salt, _sized(our_x) + _sized(our_y)


def start_salted_session(transport: Transport, salt_handle: int, salt_key: SaltKey) -> SaltedSession:
    """Start a salted HMAC session with TPM2_StartAuthSession (Part 3, section 11.1)."""
    salt, encrypted_salt = _encrypted_salt(salt_key)
    nonce_caller = os.urandom(hashlib.new(_SESSION_HASH).digest_size)
    body = (
        struct.pack(">II", salt_handle, TPM_RH_NULL)
        + _sized(nonce_caller)
        + _sized(encrypted_salt)
        + bytes([TPM_SE_HMAC])
        + struct.pack(">HHH", TPM_ALG_AES, _SESSION_AES_BITS, TPM_ALG_CFB)
        + struct.pack(">H", TPM_ALG_SHA256)
    )
    _, rest = execute(transport, _command(TPM_ST_NO_SESSIONS, TPM_CC_START_AUTH_SESSION, body))
    reader = _Reader(rest, "TPM2_StartAuthSession response")
    handle = reader.u32()
    try:
        nonce_tpm = reader.sized()
        reader.end()
    except TpmResponseError:
        # The TPM has started a session that cannot be used.  Without a
        # resource manager it would keep one of the TPM's few session slots.
        if handle >> 24 == TPM2_HT.HMAC_SESSION:
            _flush_quietly(transport, handle)
        raise

    # Part 1, section 19.6.8: with no bind, the key is made from the salt alone.
    bits = hashlib.new(_SESSION_HASH).digest_size * 8
    session_key = kdfa(_SESSION_HASH, salt, b"ATH", nonce_tpm, nonce_caller, bits)
    return SaltedSession(handle=handle, session_key=session_key, nonce_tpm=nonce_tpm)


def sign(
    transport: Transport,
    session: SaltedSession,
    key_handle: int,
    key_name: bytes,
    auth_value: bytes,
    digest: bytes,
    scheme: bytes,
    validation: bytes,
) -> bytes:
    """Run TPM2_Sign (Part 3, section 20.2) in ``session`` and return the marshalled TPMT_SIGNATURE.

    ``scheme`` and ``validation`` are the marshalled TPMT_SIG_SCHEME and
    TPMT_TK_HASHCHECK.  ``auth_value`` (the PIN) keys the command's HMAC
    and the digest's encryption; it is never sent.  The session's nonce
    moves on only when the response checks out.
    """
    hash_name = _SESSION_HASH
    hmac_key = session.session_key + _strip_trailing_zeros(auth_value)
    nonce_caller = os.urandom(hashlib.new(hash_name).digest_size)

    # Part 1, section 21.3: the first parameter's data (not its size) is
    # encrypted with AES-CFB, key and IV from KDFa over the session value.
    key_bytes = _SESSION_AES_BITS // 8
    key_and_iv = kdfa(hash_name, hmac_key, b"CFB", nonce_caller, session.nonce_tpm, (key_bytes + 16) * 8)
    encryptor = Cipher(algorithms.AES(key_and_iv[:key_bytes]), CFB(key_and_iv[key_bytes:])).encryptor()
    parameters = _sized(encryptor.update(digest) + encryptor.finalize()) + scheme + validation

    # The cpHash covers the parameters as sent, encrypted (Part 1, section 18.7).
    cp_hash = hashlib.new(hash_name, struct.pack(">I", TPM_CC_SIGN) + key_name + parameters).digest()
    attributes = bytes([SIGN_SESSION_ATTRIBUTES])
    command_hmac = hmac.digest(hmac_key, cp_hash + nonce_caller + session.nonce_tpm + attributes, hash_name)
    authorization = struct.pack(">I", session.handle) + _sized(nonce_caller) + attributes + _sized(command_hmac)
    body = struct.pack(">II", key_handle, len(authorization)) + authorization + parameters

    tag, rest = execute(transport, _command(TPM_ST_SESSIONS, TPM_CC_SIGN, body))
    if tag != TPM_ST_SESSIONS:
        raise TpmResponseError("invalid TPM2_Sign response: the session area is missing")
    reader = _Reader(rest, "TPM2_Sign response")
    response_parameters = reader.take(reader.u32())
    nonce_tpm = reader.sized()
    response_attributes = reader.take(1)
    response_hmac = reader.sized()
    reader.end()

    rp_hash = hashlib.new(hash_name, struct.pack(">II", 0, TPM_CC_SIGN) + response_parameters).digest()
    expected = hmac.digest(hmac_key, rp_hash + nonce_tpm + nonce_caller + response_attributes, hash_name)
    if not hmac.compare_digest(expected, response_hmac):
        raise TpmResponseError(
            "the TPM2_Sign response failed its HMAC check: it did not come from the TPM "
            "that has the storage key, or it was changed on the way. The signature is not used"
        )
    session.nonce_tpm = nonce_tpm
    return response_parameters


def flush(transport: Transport, handle: int) -> None:
    """Flush a session or transient object with TPM2_FlushContext (Part 3, section 28.4)."""
    _, rest = execute(transport, _command(TPM_ST_NO_SESSIONS, TPM_CC_FLUSH_CONTEXT, struct.pack(">I", handle)))
    _Reader(rest, "TPM2_FlushContext response").end()


def _flush_quietly(transport: Transport, handle: int) -> None:
    """Flush ``handle`` while another error is being raised, which is the one reported."""
    try:
        flush(transport, handle)
    except (TSS2_Exception, TpmResponseError) as exc:
        logger.debug("flushing handle 0x%08x failed: %s", handle, exc)
