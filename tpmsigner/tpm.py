"""One ESAPI context to one TPM, used by one thread at a time.

All TPM work goes through ``Tpm``: it owns the ESAPI context, the storage
root key handle and one salted HMAC session with parameter encryption for
signatures (computed by ``tpmsigner.tpmsession``, not by ESAPI, for the
reason given there), and it flushes every transient object it loads.  Signing keys
stay loaded between signatures, a bounded few (see
``tpmsigner.loadedkeys``).  swtpm without a resource manager has only three
object slots, so a leaked handle would stop the signer after a few requests.

Every public method takes ``self._lock``, so calls from several threads are
serialised.  The signer runs them on a single worker thread, off the event
loop (see ``tpmsigner.signer.worker``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_ECC,
    TPM2_HT,
    TPM2_RC,
    TPM2_RH,
    TPM2_SE,
    TPM2_ST,
    TPMA_OBJECT,
    TPMA_SESSION,
    TSS2_RC,
)
from tpm2_pytss.TCTILdr import TCTILdr
from tpm2_pytss.types import (
    TPM2B_DATA,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_PCR_SELECTION,
    TPMS_SCHEME_HASH,
    TPMT_PUBLIC_PARMS,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMT_TK_HASHCHECK,
    TPMU_SIG_SCHEME,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from .errors import (
    KeyFileError,
    ProtocolError,
    TpmAuthError,
    TpmError,
    TpmKeyLoadError,
    TpmLockoutError,
    TpmUnavailableError,
    UnsupportedByTpmError,
)
from .keytypes import DEFAULT_KEY_TYPE, KEY_TYPES, KeyType
from .loadedkeys import LoadedKeys, loaded_key_capacity
from .tcti import has_resource_manager
from . import tpmsession
from .tpmsession import SaltedSession, TpmResponseError
from .protocol.sshkeys import NISTP256, NISTP384, EcdsaPublicKey, RsaPublicKey, SshPublicKey, public_key_from_blob
from .templates import (
    SIGNING_KEY_FORBIDDEN,
    SIGNING_KEY_REQUIRED,
    SRK_PERSISTENT_HANDLE,
    ecc_signing_key_template,
    rsa_signing_key_template,
    srk_ecc_p256_template,
)

logger = logging.getLogger(__name__)

DEFAULT_TCTI = "device:/dev/tpmrm0"

# TPM2_RH_OWNER as the parent of a TSS2 PRIVATE KEY file means "the H-2
# primary under the owner hierarchy", created on demand.
PARENT_OWNER = 0x40000001


def describe_parent(parent: int) -> str:
    """Return a key file's parent handle in words, for output that people read.

    PARENT_OWNER is a hierarchy, not a key's handle, so it is named after
    the primary key that is created under it.
    """
    if parent == PARENT_OWNER:
        return "owner-hierarchy primary (created on demand)"
    if parent >> 24 == TPM2_HT.PERSISTENT:
        return f"persistent key 0x{parent:08x}"
    return f"handle 0x{parent:08x}"

_TPM_CURVE_IDS = {NISTP256.ssh_name: TPM2_ECC.NIST_P256, NISTP384.ssh_name: TPM2_ECC.NIST_P384}
_CURVES_BY_TPM_ID = {TPM2_ECC.NIST_P256: NISTP256, TPM2_ECC.NIST_P384: NISTP384}
_TPM_HASH_ALGS = {
    "sha1": TPM2_ALG.SHA1,
    "sha256": TPM2_ALG.SHA256,
    "sha384": TPM2_ALG.SHA384,
    "sha512": TPM2_ALG.SHA512,
}
RSA_DEFAULT_EXPONENT = 65537

# An object's authValue may be no longer than the digest of its nameAlg
# (TPM 2.0 Library Part 1, section 19.6.4); keys here use SHA-256.
MAX_PIN_BYTES = 32


def check_pin_length(pin: bytes) -> None:
    """Raise ValueError for a PIN that is empty or longer than a key can have."""
    if not pin:
        raise ValueError("the PIN is empty; every key needs a PIN")
    if not pin.rstrip(b"\0"):
        # The TPM drops trailing zero bytes from a new authValue (swtpm
        # does), so this key would get an empty one that any local process
        # can sign with.
        raise ValueError("the PIN has only zero bytes, which the TPM drops; every key needs a PIN")
    if len(pin) > MAX_PIN_BYTES:
        raise ValueError(
            f"the PIN is {len(pin)} bytes long; a TPM key's PIN can have at most {MAX_PIN_BYTES} bytes (UTF-8)"
        )

# A TPM signature as the TPM returns it: (r, s) for ECDSA, the RSASSA
# signature bytes for RSA.
RawSignature = tuple[int, int] | bytes

# How long a lockout status read that showed no lockout stands in for a new
# read (see Tpm.recent_lockout_status).  The check only spares a person a
# prompt and the TPM a PIN it would reject: the TPM enforces the lockout
# itself (TPM 2.0 Library Part 1, section 19.8), so a lockout that starts
# in between still fails the signature with TPM_RC_LOCKOUT, and such a try
# is not counted.
LOCKOUT_STATUS_REUSE_SECONDS = 1.0

_TSS_LAYER_MASK = 0xFF0000
_TSS_BASE_MASK = 0xFFFF
# TSS2 base codes that mean the TCTI lost or never had its connection.
_CONNECTION_BASE_CODES = {
    TSS2_RC.BASE_RC_IO_ERROR & _TSS_BASE_MASK,
    TSS2_RC.BASE_RC_NO_CONNECTION & _TSS_BASE_MASK,
    TSS2_RC.BASE_RC_TRY_AGAIN & _TSS_BASE_MASK,
}
# TPM_RC_REFERENCE_H0..H6 and _S0..S6 (TPM 2.0 Library Part 2, section 6.6, TPM_RC):
# a handle or session in the command is not loaded.  For handles this
# program cached, that means the TPM was restarted under it.
_NOT_LOADED_CODES = {
    *range(TPM2_RC.REFERENCE_H0, TPM2_RC.REFERENCE_H6 + 1),
    *range(TPM2_RC.REFERENCE_S0, TPM2_RC.REFERENCE_S6 + 1),
}


@dataclass(frozen=True)
class TpmKeyBlob:
    """A key wrapped by the TPM: what a TSS2 PRIVATE KEY file contains."""

    public: bytes    # marshalled TPM2B_PUBLIC
    private: bytes   # marshalled TPM2B_PRIVATE, encrypted by the parent
    parent: int      # persistent parent handle, or PARENT_OWNER


def public_key_of(blob: TpmKeyBlob) -> SshPublicKey:
    """Return the SSH public key of a wrapped key, checking its attributes.

    Raises TpmKeyLoadError for a key tpmsigner does not use, and
    KeyFileError for a public area whose point or modulus is not a valid
    key, which a damaged or crafted key file can hold.
    """
    return _public_key_of_area(blob.public)


# The same public area always gives the same key (errors are not kept), and
# unmarshalling it through tpm2-pytss takes about 0.1 ms, twice per
# signature, so results are kept for the keys in use.
@functools.lru_cache(maxsize=64)
def _public_key_of_area(marshalled_public: bytes) -> SshPublicKey:
    public, _ = TPM2B_PUBLIC.unmarshal(marshalled_public)
    area = public.publicArea

    attributes = int(area.objectAttributes)
    if attributes & SIGNING_KEY_REQUIRED != SIGNING_KEY_REQUIRED or attributes & SIGNING_KEY_FORBIDDEN:
        raise TpmKeyLoadError(
            f"key attributes {_attribute_names(attributes)} are not those of a PIN-protected "
            "signing key (need fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|sign, "
            "and no decrypt, noDA or restricted)"
        )

    if area.type == TPM2_ALG.ECC:
        curve = _CURVES_BY_TPM_ID.get(area.parameters.eccDetail.curveID)
        if curve is None:
            raise TpmKeyLoadError(f"ECC curve {area.parameters.eccDetail.curveID} is not supported")
        x = bytes(area.unique.ecc.x.buffer)
        y = bytes(area.unique.ecc.y.buffer)
        if len(x) > curve.coordinate_size or len(y) > curve.coordinate_size:
            raise KeyFileError(
                f"the public key's coordinates have {len(x)} and {len(y)} bytes; "
                f"{curve.ssh_name} allows at most {curve.coordinate_size}"
            )
        return _checked_public_key(EcdsaPublicKey(curve, int.from_bytes(x, "big"), int.from_bytes(y, "big")))

    if area.type == TPM2_ALG.RSA:
        exponent = int(area.parameters.rsaDetail.exponent) or RSA_DEFAULT_EXPONENT
        modulus = int.from_bytes(bytes(area.unique.rsa.buffer), "big")
        return _checked_public_key(RsaPublicKey(modulus, exponent))

    raise TpmKeyLoadError(f"key type {area.type} is not supported; only ECDSA and RSA keys are")


def _attribute_names(attributes: int) -> str:
    """Return TPMA_OBJECT bits as names, or as hex when reserved bits are set.

    tpm2-pytss's TPMA_OBJECT.__str__ raises ValueError for bits that have
    no name (TPM 2.0 Library Part 2, section 8.3.2, marks them reserved).
    """
    try:
        return f"{TPMA_OBJECT(attributes)!s} (0x{attributes:08x})"
    except ValueError:
        return f"0x{attributes:08x}"


def _checked_public_key(key: SshPublicKey) -> SshPublicKey:
    """Return ``key`` if its SSH blob parses back: a point on its curve, a usable modulus."""
    try:
        public_key_from_blob(key.blob)
    except ProtocolError as exc:
        raise KeyFileError(f"the key's public area is not a valid public key: {exc}") from None
    return key


def key_type_of(blob: TpmKeyBlob) -> KeyType | None:
    """Return the KeyType of a wrapped key, or None for a size we do not create."""
    public_key = public_key_of(blob)
    for key_type in KEY_TYPES.values():
        if isinstance(public_key, EcdsaPublicKey) and key_type.curve == public_key.curve:
            return key_type
        if isinstance(public_key, RsaPublicKey) and key_type.rsa_bits == public_key.bits:
            return key_type
    return None


def _template_for(key_type: KeyType):
    if key_type.curve is not None:
        return ecc_signing_key_template(_TPM_CURVE_IDS[key_type.curve.ssh_name])
    assert key_type.rsa_bits is not None
    return rsa_signing_key_template(key_type.rsa_bits)


# The scheme and the (empty) hash check ticket of TPM2_Sign, built and
# marshalled once per scheme: tpm2-pytss objects cost tens of microseconds
# each to build.
@functools.lru_cache(maxsize=16)
def _sign_parameters(scheme_alg: int, hash_alg: int) -> tuple[bytes, bytes]:
    """Return the marshalled TPMT_SIG_SCHEME and TPMT_TK_HASHCHECK (a NULL ticket) of a signature."""
    if scheme_alg == TPM2_ALG.ECDSA:
        details = TPMU_SIG_SCHEME(ecdsa=TPMS_SCHEME_HASH(hashAlg=hash_alg))
    else:
        details = TPMU_SIG_SCHEME(rsassa=TPMS_SCHEME_HASH(hashAlg=hash_alg))
    scheme = TPMT_SIG_SCHEME(scheme=scheme_alg, details=details)
    ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
    return bytes(scheme.marshal()), bytes(ticket.marshal())


@functools.lru_cache(maxsize=64)
def _object_name(marshalled_public: bytes) -> bytes:
    return tpmsession.object_name(marshalled_public)


def _raw_signature(marshalled: bytes, scheme_alg: int) -> RawSignature:
    """Read (r, s) or the RSASSA signature from a marshalled TPMT_SIGNATURE.

    TPM 2.0 Library Part 2, TPMT_SIGNATURE: UINT16 sigAlg, then for ECDSA
    UINT16 hash and two TPM2B (r, s), for RSASSA UINT16 hash and one TPM2B.
    Reading the bytes costs a tenth of tpm2-pytss's attribute access.
    """
    offset = 4
    values = []
    try:
        (sig_alg,) = struct.unpack_from(">H", marshalled)
        for _ in range(2 if scheme_alg == TPM2_ALG.ECDSA else 1):
            (size,) = struct.unpack_from(">H", marshalled, offset)
            values.append(marshalled[offset + 2 : offset + 2 + size])
            offset += 2 + size
    except struct.error:
        raise TpmError("the TPM returned a truncated signature") from None
    if sig_alg != scheme_alg or offset != len(marshalled):
        raise TpmError(
            f"the TPM returned a signature of scheme 0x{sig_alg:04x} and {len(marshalled)} bytes, "
            f"not one of scheme 0x{scheme_alg:04x}"
        )
    if scheme_alg == TPM2_ALG.RSASSA:
        return values[0]
    return int.from_bytes(values[0], "big"), int.from_bytes(values[1], "big")


def _response_code(exc: TSS2_Exception) -> int:
    """Return a TPM response code without its handle, session or parameter bits."""
    rc = int(exc.rc)
    if rc & _TSS_LAYER_MASK:
        return rc
    if rc & TPM2_RC.FMT1:
        return TPM2_RC.FMT1 | (rc & 0x3F)
    return rc & 0xFFF


def _is_connection_error(exc: TSS2_Exception) -> bool:
    rc = int(exc.rc)
    return bool(rc & _TSS_LAYER_MASK) and (rc & _TSS_BASE_MASK) in _CONNECTION_BASE_CODES


def _flush_each(esapi: ESAPI, handles: list[int]) -> None:
    """Flush each TPM handle, best effort, through the context's TCTI.

    Each handle is flushed on its own, so one that is already gone (flushed
    by another client) leaves no other loaded.  The raw command still works
    when ESAPI itself has failed.
    """
    for handle in handles:
        try:
            tpmsession.flush(esapi.tcti, handle)
        except (TSS2_Exception, TpmResponseError) as exc:
            logger.debug("flushing TPM handle 0x%08x failed: %s", handle, exc)
            if isinstance(exc, TSS2_Exception) and _is_connection_error(exc):
                # The remaining flushes would fail the same way.
                return


def _startup_counts(esapi: ESAPI) -> tuple[int, int]:
    """Return the TPM's (resetCount, restartCount), read with TPM2_ReadClock."""
    clock_info = esapi.read_clock().clockInfo
    return int(clock_info.resetCount), int(clock_info.restartCount)


# TPM 2.0 Library Part 2, section 6.13 (TPM_PT): fixed and variable properties.
PT_MANUFACTURER = 0x105
PT_VENDOR_STRING = (0x106, 0x107, 0x108, 0x109)
PT_FIRMWARE_VERSION_1 = 0x10B
PT_FIRMWARE_VERSION_2 = 0x10C
PT_PERMANENT = 0x200
PT_LOCKOUT_COUNTER = 0x20E
PT_MAX_AUTH_FAIL = 0x20F
PT_LOCKOUT_INTERVAL = 0x210
PT_LOCKOUT_RECOVERY = 0x211
PERMANENT_IN_LOCKOUT = 0x200     # TPMA_PERMANENT.inLockout


@dataclass(frozen=True)
class LockoutStatus:
    """The TPM's dictionary-attack state (TPM 2.0 Library Part 1, section 19.8)."""

    failed_tries: int       # TPM_PT_LOCKOUT_COUNTER
    max_tries: int          # TPM_PT_MAX_AUTH_FAIL
    interval: int           # seconds for one failed try to be forgotten
    recovery: int           # seconds before lockoutAuth may be tried again
    in_lockout: bool

    @property
    def tries_left(self) -> int:
        return max(self.max_tries - self.failed_tries, 0)


@dataclass(frozen=True)
class TpmInfo:
    """The TPM's identity and lockout state, as ``tpmsigner status`` prints them."""

    manufacturer: str
    vendor: str
    firmware_version: str
    lockout: LockoutStatus


def _ascii_property(value: int) -> str:
    return value.to_bytes(4, "big").rstrip(b"\0").decode("ascii", errors="replace").strip()


class Tpm:
    """A TPM reached through one TCTI, with a lazily opened ESAPI context.

    If the TPM connection fails, the context is dropped and the next call
    opens a new one.  Before a command uses the cached storage key or
    session, the TPM's reset and restart counts are compared with those
    seen when they were loaded, so a restarted TPM (or swtpm) is picked up
    without restarting the program and without a failed request.
    """

    def __init__(
        self,
        tcti: str = DEFAULT_TCTI,
        *,
        flush_stale_handles: bool = False,
        parent_check: Callable[[int, bytes], None] | None = None,
    ) -> None:
        """Prepare a TPM at ``tcti``; nothing is sent until the first call.

        ``parent_check(parent_handle, name)`` is called with the TPM name of
        each storage parent when it is first loaded, and may raise to refuse
        a parent whose name is not the recorded one (see ``store.TpmBinding``).
        """
        self.tcti = tcti
        self.flush_stale_handles = flush_stale_handles
        self.parent_check = parent_check
        self._lock = threading.Lock()
        self._esapi: ESAPI | None = None
        self._parents: dict[int, ESYS_TR] = {}
        self._flush_parents: set[int] = set()
        # The session every signature uses (tpmsigner.tpmsession).  ESAPI
        # sessions are started only for the rare commands that carry a new
        # PIN (creating a key, changing a PIN) and flushed right after.
        self._session: SaltedSession | None = None
        self._algorithms: set[int] | None = None
        # (resetCount, restartCount) when the context was opened.
        self._startup_counts: tuple[int, int] | None = None
        # Signing keys stay loaded between signatures (see tpmsigner.loadedkeys).
        self._loaded: LoadedKeys[ESYS_TR] = LoadedKeys(loaded_key_capacity(tcti))
        # (when, status) of the last lockout status read, if it showed no
        # lockout and no TPM error came since.
        self._clear_status: tuple[float, LockoutStatus] | None = None

    # ---- context lifecycle -------------------------------------------------

    def close(self) -> None:
        """Flush the session and transient parents, and close the context."""
        with self._lock:
            self._reset()

    def __enter__(self) -> "Tpm":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _reset(self, *, flush_handles: bool = True) -> None:
        """Drop the context and every cached handle; flush those handles first if ``flush_handles``.

        After a TPM restart the handle numbers may already name another
        client's objects, so that caller passes ``flush_handles=False``.
        """
        esapi, self._esapi = self._esapi, None
        session, self._session = self._session, None
        parents, self._parents = self._parents, {}
        flush_parents, self._flush_parents = self._flush_parents, set()
        loaded_keys = self._loaded.clear()
        self._algorithms = None
        self._startup_counts = None
        self._clear_status = None
        if esapi is None:
            return

        if flush_handles:
            handles = [] if session is None else [session.handle]
            handles += [int(esapi.tr_get_tpm_handle(handle)) for handle in loaded_keys]
            handles += [
                int(esapi.tr_get_tpm_handle(handle))
                for parent_handle, handle in parents.items()
                if parent_handle in flush_parents
            ]
            _flush_each(esapi, handles)
        try:
            esapi.close()
        except TSS2_Exception as exc:
            logger.debug("closing the ESAPI context failed: %s", exc)

    def _context(self) -> ESAPI:
        if self._esapi is None:
            try:
                self._esapi = ESAPI(TCTILdr.parse(self.tcti))
            except TSS2_Exception as exc:
                raise TpmUnavailableError(
                    f"cannot open the TPM at TCTI {self.tcti!r}: {exc}. Check that the TPM "
                    "(or swtpm) is running and that --tcti, TPMSIGNER_TCTI or the configuration file's tcti names it",
                    rc=int(exc.rc),
                ) from None
            if self.flush_stale_handles and not has_resource_manager(self.tcti):
                self._flush_stale_handles(self._esapi)
        return self._esapi

    def _current_context(self) -> ESAPI:
        """Return a context whose cached handles still exist in the TPM, reconnecting if needed.

        resetCount and restartCount change only when the TPM is reset,
        restarted or cleared (TPM 2.0 Library Part 2, section 10.11.1,
        TPMS_CLOCK_INFO), and each of these drops the transient objects and
        sessions loaded before.  The swtpm TCTI connects anew for every
        command, so after swtpm restarts on the same port nothing else shows
        that the storage key and session cached here are gone.  Callers run
        this before a PIN is used, so a reconnection never resends a PIN.
        """
        if self._esapi is not None:
            try:
                counts = _startup_counts(self._esapi)
            except TSS2_Exception as exc:
                if not _is_connection_error(exc):
                    raise
                logger.warning("lost the connection to the TPM at %r (%s); reconnecting", self.tcti, exc)
                self._reset()
            else:
                if self._startup_counts is None:
                    # Opened by a call that caches no handles, so nothing can be stale yet.
                    self._startup_counts = counts
                if counts == self._startup_counts:
                    return self._esapi
                logger.warning(
                    "the TPM at %r was reset or restarted (reset count %d -> %d, restart count %d -> %d), so it "
                    "no longer has the storage key and session loaded before; opening a new context",
                    self.tcti,
                    self._startup_counts[0],
                    counts[0],
                    self._startup_counts[1],
                    counts[1],
                )
                self._reset(flush_handles=False)

        esapi = self._context()
        self._startup_counts = _startup_counts(esapi)
        return esapi

    def _flush_stale_handles(self, esapi: ESAPI) -> None:
        """Flush every transient object and loaded session found when the context opens.

        An emulator reached without a resource manager keeps what a killed
        process loaded across connections, and after two or three such leaks
        it has no object slot left.  The TPM cannot tell those handles from
        the ones a live client still uses, so only a long-running owner of
        the TPM turns this on: ``serve``, whose first TPM call comes after it
        has bound its listening address.
        """
        for handle_type in (TPM2_HT.TRANSIENT, TPM2_HT.LOADED_SESSION):
            try:
                _, data = esapi.get_capability(TPM2_CAP.HANDLES, handle_type << 24, 64)
                for handle in list(data.data.handles):
                    esapi.flush_context(esapi.tr_from_tpmpublic(handle))
                    logger.warning(
                        "flushed TPM handle 0x%08x, which was already loaded when tpmsigner connected to %r: "
                        "either a killed process left it, or another program that uses this TPM without a "
                        "resource manager has lost it",
                        handle,
                        self.tcti,
                    )
            except TSS2_Exception as exc:
                logger.warning("could not flush the TPM handles that were loaded before tpmsigner connected: %s", exc)

    def _translate(self, exc: TSS2_Exception, what: str) -> TpmError:
        """Turn a TSS2 exception into a TpmError, resetting state as needed."""
        code = _response_code(exc)
        self._clear_status = None

        if _is_connection_error(exc):
            self._reset()
            return TpmUnavailableError(
                f"{what} failed: lost the connection to the TPM at {self.tcti!r} ({exc}); "
                "the next request reconnects",
                rc=int(exc.rc),
            )
        if code in _NOT_LOADED_CODES:
            if self._restarted():
                self._reset(flush_handles=False)
                cause = "it was restarted during the command"
            else:
                # Another client of a TPM without a resource manager flushed
                # one handle, so the others are still this program's to flush.
                self._reset()
                cause = "another program that shares the TPM without a resource manager flushed it"
            return TpmUnavailableError(
                f"{what} failed: the TPM no longer has the storage key, signing key or session loaded "
                f"before ({exc}); {cause}. The next request loads them again",
                rc=int(exc.rc),
            )

        # A failed authorisation leaves the ESAPI session nonces out of step
        # with the TPM's, so start a fresh session for the next command.  Any
        # other error may mean a handle we cached is gone, so start over.
        if code in (TPM2_RC.AUTH_FAIL, TPM2_RC.LOCKOUT):
            self._drop_session()
        else:
            self._reset()

        if code == TPM2_RC.AUTH_FAIL:
            return TpmAuthError(f"{what} failed: wrong PIN{self._tries_left_text()}", rc=int(exc.rc))
        if code == TPM2_RC.LOCKOUT:
            return self._lockout_error(what, rc=int(exc.rc))
        if code == TPM2_RC.OBJECT_MEMORY:
            return TpmError(
                f"{what} failed: the TPM is out of object memory; another program may be "
                "holding transient objects (use a resource manager such as /dev/tpmrm0)",
                rc=int(exc.rc),
            )
        return TpmError(f"{what} failed: {exc}", rc=int(exc.rc))

    def _restarted(self) -> bool:
        """Return whether the TPM was reset or restarted since the context was opened; True if unknown."""
        if self._esapi is None or self._startup_counts is None:
            return True
        try:
            return _startup_counts(self._esapi) != self._startup_counts
        except TSS2_Exception:
            return True

    def _tries_left_text(self) -> str:
        try:
            status = self._lockout_status()
        except (TSS2_Exception, TpmError):
            return ""
        if status.in_lockout or status.tries_left <= 0:
            return "; that was the last try: the TPM is now in dictionary-attack lockout"
        return f"; {status.tries_left} of {status.max_tries} tries left before the TPM locks out"

    def _lockout_error(self, what: str, rc: int | None = None) -> TpmLockoutError:
        try:
            interval = self._lockout_status().interval
            wait = f"the next try is allowed within {interval} s"
        except (TSS2_Exception, TpmError):
            wait = "wait for the lockout interval to pass"
        return TpmLockoutError(
            f"{what} failed: the TPM is in dictionary-attack lockout after too many wrong PINs; "
            f"{wait}, or an administrator can reset it with tpm2_dictionarylockout --clear-lockout",
            rc=rc,
        )

    def _properties(self, first: int, count: int) -> dict[int, int]:
        _, data = self._context().get_capability(TPM2_CAP.TPM_PROPERTIES, first, count)
        return {int(item.property): int(item.value) for item in data.data.tpmProperties}

    def _lockout_status(self) -> LockoutStatus:
        values = self._properties(PT_PERMANENT, PT_LOCKOUT_RECOVERY - PT_PERMANENT + 1)
        status = LockoutStatus(
            failed_tries=values.get(PT_LOCKOUT_COUNTER, 0),
            max_tries=values.get(PT_MAX_AUTH_FAIL, 0),
            interval=values.get(PT_LOCKOUT_INTERVAL, 0),
            recovery=values.get(PT_LOCKOUT_RECOVERY, 0),
            in_lockout=bool(values.get(PT_PERMANENT, 0) & PERMANENT_IN_LOCKOUT),
        )
        self._clear_status = None if status.in_lockout else (time.monotonic(), status)
        return status

    def lockout_status(self) -> LockoutStatus:
        """Return the dictionary-attack counter and settings."""
        with self._lock:
            try:
                return self._lockout_status()
            except TSS2_Exception as exc:
                raise self._translate(exc, "reading the lockout state") from None

    def check_ready(self, parent: int) -> LockoutStatus:
        """Prepare for a signature under storage parent ``parent`` and return the lockout state.

        Whatever can fail without a PIN fails here, before a person is asked
        for one.  The TPM is reconnected after a lost connection or a
        restart.  Unless the TPM is in lockout, the parent is loaded and
        checked by ``parent_check``, and the salted session is started.
        """
        with self._lock:
            try:
                self._current_context()
                # sign_digest reuses a recent clear status in the same way.
                status = self.recent_lockout_status() or self._lockout_status()
                if not status.in_lockout:
                    self._parent(parent)
                    self._signing_session(parent)
            except TSS2_Exception as exc:
                raise self._translate(exc, "preparing the TPM") from None
        return status

    def info(self) -> TpmInfo:
        """Return the manufacturer, firmware version and lockout state."""
        with self._lock:
            try:
                fixed = self._properties(PT_MANUFACTURER, PT_FIRMWARE_VERSION_2 - PT_MANUFACTURER + 1)
                lockout = self._lockout_status()
            except TSS2_Exception as exc:
                raise self._translate(exc, "reading TPM properties") from None
        version_1 = fixed.get(PT_FIRMWARE_VERSION_1, 0)
        version_2 = fixed.get(PT_FIRMWARE_VERSION_2, 0)
        return TpmInfo(
            manufacturer=_ascii_property(fixed.get(PT_MANUFACTURER, 0)),
            vendor="".join(_ascii_property(fixed.get(prop, 0)) for prop in PT_VENDOR_STRING),
            firmware_version=f"{version_1 >> 16}.{version_1 & 0xFFFF}.{version_2 >> 16}.{version_2 & 0xFFFF}",
            lockout=lockout,
        )

    def _drop_session(self) -> None:
        session, self._session = self._session, None
        if session is not None and self._esapi is not None:
            try:
                tpmsession.flush(self._esapi.tcti, session.handle)
            except (TSS2_Exception, TpmResponseError) as exc:
                logger.debug("flushing the HMAC session failed: %s", exc)

    # ---- parents and sessions ----------------------------------------------

    def _has_persistent_srk(self, esapi: ESAPI) -> bool:
        more = True
        start = TPM2_HT.PERSISTENT << 24
        while more:
            more, data = esapi.get_capability(TPM2_CAP.HANDLES, start, 64)
            handles = list(data.data.handles)
            if SRK_PERSISTENT_HANDLE in handles:
                return True
            if not handles:
                break
            start = handles[-1] + 1
        return False

    def _parent(self, parent: int) -> ESYS_TR:
        """Return a loaded handle for a key file's parent, creating it if needed."""
        if parent in self._parents:
            return self._parents[parent]

        esapi = self._context()
        if parent == PARENT_OWNER:
            handle, _, _, _, _ = esapi.create_primary(
                TPM2B_SENSITIVE_CREATE(),
                TPM2B_PUBLIC(publicArea=srk_ecc_p256_template()),
                ESYS_TR.RH_OWNER,
                TPM2B_DATA(),
                TPML_PCR_SELECTION(),
            )
            self._flush_parents.add(parent)
        elif parent >> 24 == TPM2_HT.PERSISTENT:
            handle = esapi.tr_from_tpmpublic(parent)
        else:
            raise TpmKeyLoadError(f"key parent handle 0x{parent:08x} is not supported")

        if self.parent_check is not None:
            try:
                self.parent_check(parent, bytes(esapi.tr_get_name(handle)))
            except BaseException:
                if parent == PARENT_OWNER:
                    self._flush_quietly(handle)
                    self._flush_parents.discard(parent)
                raise

        self._parents[parent] = handle
        return handle

    def _default_parent(self) -> int:
        """Return the parent for new keys: the persistent SRK if provisioned."""
        esapi = self._context()
        return SRK_PERSISTENT_HANDLE if self._has_persistent_srk(esapi) else PARENT_OWNER

    def _signing_session(self, salt_parent: int) -> SaltedSession:
        """Return the salted HMAC session for signatures, starting it on first use.

        The salt is encrypted to the storage key (TPM 2.0 Library Part 1,
        section 19.6.11), so the session key, and with it every
        PIN-derived HMAC and every encrypted parameter, stays unknown to
        anyone watching the bus.  The storage key's public area is read
        from the TPM and must hash to the name ``parent_check`` accepted.
        AES-128-CFB is the parameter-encryption cipher every TPM 2.0
        implements.
        """
        if self._session is None:
            esapi = self._context()
            parent_handle = self._parent(salt_parent)
            public, _, _ = esapi.read_public(parent_handle)
            if tpmsession.object_name(bytes(public.marshal())) != bytes(esapi.tr_get_name(parent_handle)):
                raise TpmError(
                    f"the storage key ({describe_parent(salt_parent)}) returned a public area that does not match "
                    "its name, so the TPM or the connection to it is not the one the key files were made on"
                )
            self._session = tpmsession.start_salted_session(
                esapi.tcti,
                int(esapi.tr_get_tpm_handle(parent_handle)),
                tpmsession.salt_key_from_public(public.publicArea),
            )
        return self._session

    @contextlib.contextmanager
    def _esys_session(self, salt_parent: int) -> Iterator[ESYS_TR]:
        """Start an ESAPI salted HMAC session for one command that carries a new PIN, and flush it after.

        TPM2_Create and TPM2_ObjectChangeAuth are rare, so ESAPI's slower
        session code is fine for them.  DECRYPT encrypts the first command
        parameter, the new PIN; ENCRYPT encrypts the first response
        parameter, the new private part.
        """
        esapi = self._context()
        session = esapi.start_auth_session(
            tpm_key=self._parent(salt_parent),
            bind=ESYS_TR.NONE,
            session_type=TPM2_SE.HMAC,
            symmetric=TPMT_SYM_DEF(
                algorithm=TPM2_ALG.AES,
                keyBits=TPMU_SYM_KEY_BITS(aes=128),
                mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
            ),
            auth_hash=TPM2_ALG.SHA256,
        )
        try:
            esapi.trsess_set_attributes(
                session, TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.DECRYPT | TPMA_SESSION.ENCRYPT
            )
            yield session
        finally:
            self._flush_quietly(session)

    # ---- operations --------------------------------------------------------

    def supported_key_types(self) -> list[KeyType]:
        """Return the key types this TPM accepts, asked with TPM2_TestParms."""
        with self._lock:
            return [key_type for key_type in KEY_TYPES.values() if self._supports(key_type)]

    def _supports(self, key_type: KeyType) -> bool:
        template = _template_for(key_type)
        parameters = TPMT_PUBLIC_PARMS(type=template.type, parameters=template.parameters)
        try:
            self._context().test_parms(parameters)
        except TSS2_Exception as exc:
            if _is_connection_error(exc):
                raise self._translate(exc, "asking the TPM which key types it supports") from None
            return False
        return True

    def create_key(self, pin: bytes, key_type: KeyType = DEFAULT_KEY_TYPE) -> TpmKeyBlob:
        """Create a signing key of ``key_type`` with ``pin`` as its authorisation value.

        Raise UnsupportedByTpmError, naming the types this TPM does support,
        before anything is created if the TPM rejects the key's parameters.
        """
        check_pin_length(pin)

        with self._lock:
            try:
                self._current_context()
                if not self._supports(key_type):
                    supported = [other.name for other in KEY_TYPES.values() if self._supports(other)]
                    raise UnsupportedByTpmError(
                        f"this TPM does not support {key_type.name} keys; it supports: "
                        f"{', '.join(supported) or 'none of the types tpmsigner creates'}"
                    )
                parent = self._default_parent()
                parent_handle = self._parent(parent)
                sensitive = TPM2B_SENSITIVE_CREATE()
                sensitive.sensitive.userAuth = pin
                with self._esys_session(parent) as session:
                    private, public, _, _, _ = self._context().create(
                        parent_handle,
                        sensitive,
                        TPM2B_PUBLIC(publicArea=_template_for(key_type)),
                        TPM2B_DATA(),
                        TPML_PCR_SELECTION(),
                        session1=session,
                    )
            except TSS2_Exception as exc:
                raise self._translate(exc, "creating the key") from None

        return TpmKeyBlob(public=bytes(public.marshal()), private=bytes(private.marshal()), parent=parent)

    def _implemented_algorithms(self) -> set[int]:
        """Return the algorithm ids the TPM implements (TPM2_GetCapability, TPM_CAP_ALGS).

        The list is read once per TPM context, not on every signature.
        """
        if self._algorithms is not None:
            return self._algorithms
        more = True
        start = 0
        implemented: set[int] = set()
        while more:
            more, data = self._context().get_capability(TPM2_CAP.ALGS, start, 64)
            algorithms = list(data.data.algorithms)
            implemented.update(int(algorithm.alg) for algorithm in algorithms)
            if not algorithms:
                break
            start = int(algorithms[-1].alg) + 1
        self._algorithms = implemented
        return implemented

    def _check_hash(self, hash_name: str) -> int:
        """Return the TPM algorithm id of ``hash_name``; raise if the TPM lacks it."""
        hash_alg = _TPM_HASH_ALGS[hash_name]
        if hash_alg not in self._implemented_algorithms():
            raise UnsupportedByTpmError(
                f"this TPM does not implement {hash_name.upper()}, which the requested signature "
                "algorithm needs; ask for another one (for RSA keys: rsa-sha2-256 or rsa-sha2-512)"
            )
        return hash_alg

    def sign_digest(self, blob: TpmKeyBlob, digest: bytes, pin: bytes, hash_name: str | None = None) -> RawSignature:
        """Sign ``digest`` with a wrapped key and return the raw signature.

        ``hash_name`` names the hash that produced ``digest``; it defaults to
        the curve's hash for ECDSA keys and is required for RSA keys.  RSA
        keys sign with RSASSA-PKCS1-v1_5 only, never with a raw private-key
        operation, so the key cannot serve as a decryption oracle.  The key
        stays loaded for the next signature (see tpmsigner.loadedkeys), and
        its PIN is cleared from the ESAPI object afterwards.  A wrong PIN
        raises TpmAuthError and is never retried here, since every retry
        would count toward the dictionary-attack lockout.
        """
        if len(pin) > MAX_PIN_BYTES:
            # No key can have this PIN, so the TPM is not asked and no try is counted.
            raise TpmAuthError(f"wrong PIN: it is longer than the {MAX_PIN_BYTES} bytes a key's PIN can have")
        public_key = public_key_of(blob)
        if hash_name is None:
            if not isinstance(public_key, EcdsaPublicKey):
                raise ValueError("an RSA signature needs hash_name")
            hash_name = public_key.curve.hash_name
        scheme_alg = TPM2_ALG.ECDSA if isinstance(public_key, EcdsaPublicKey) else TPM2_ALG.RSASSA

        with self._lock:
            try:
                self._current_context()
                hash_alg = self._check_hash(hash_name)
                if self.recent_lockout_status() is None:
                    self._refuse_during_lockout("signing")
            except TSS2_Exception as exc:
                raise self._translate(exc, "signing") from None
            key_handle = self._loaded_key(blob)

            esapi = self._context()
            try:
                session = self._signing_session(blob.parent)
                scheme, ticket = _sign_parameters(scheme_alg, hash_alg)
                signature = tpmsession.sign(
                    esapi.tcti,
                    session,
                    int(esapi.tr_get_tpm_handle(key_handle)),
                    _object_name(blob.public),
                    pin,
                    digest,
                    scheme,
                    ticket,
                )
            except TSS2_Exception as exc:
                raise self._translate(exc, "signing") from None
            except TpmResponseError:
                # The session's nonces can no longer be trusted to match the TPM's.
                self._drop_session()
                raise

        return _raw_signature(signature, scheme_alg)

    def recent_lockout_status(self, max_age: float = LOCKOUT_STATUS_REUSE_SECONDS) -> LockoutStatus | None:
        """Return the last lockout status read, if it is still good, else None.

        It is good if it showed no lockout, is younger than ``max_age``
        seconds, and no TPM error came since.  Nothing is sent to the TPM and
        no lock is taken, so an event loop may call it while the TPM is busy.
        """
        recent = self._clear_status
        if recent is None or time.monotonic() - recent[0] >= max_age:
            return None
        return recent[1]

    def _loaded_key(self, blob: TpmKeyBlob) -> ESYS_TR:
        """Return the key handle for ``blob``, loading it only if it is not loaded yet."""
        key_handle = self._loaded.get(blob.parent, blob.public, blob.private)
        if key_handle is not None and self._esapi is not None:
            # The attributes were checked when this exact blob was loaded.
            return key_handle
        key_handle = self._load(blob)
        for evicted in self._loaded.put(blob.parent, blob.public, blob.private, key_handle):
            self._flush_quietly(evicted)
        return key_handle

    def flush_loaded_keys(self) -> int:
        """Flush the signing keys kept loaded between signatures; return how many there were.

        The next signature loads its key again.  The signer calls this when
        the TPM has been idle for a while (tpmsigner.signer.worker).
        """
        with self._lock:
            handles = self._loaded.clear()
            for handle in handles:
                self._flush_quietly(handle)
            return len(handles)

    def _forget_pin(self, key_handle: ESYS_TR) -> None:
        """Clear the PIN from a loaded key's ESAPI object, so it stays there no longer than one command."""
        if self._esapi is None:
            return
        try:
            self._esapi.tr_set_auth(key_handle, b"")
        except TSS2_Exception as exc:
            # Not a TPM command; it fails only for a handle already freed
            # by a reset, which freed the PIN with it.
            logger.debug("clearing a key's PIN failed: %s", exc)

    def _refuse_during_lockout(self, what: str) -> None:
        # A PIN sent during lockout is rejected without being checked, so it
        # is not sent at all.
        if self._lockout_status().in_lockout:
            raise self._lockout_error(what)

    def _load(self, blob: TpmKeyBlob) -> ESYS_TR:
        """Load a wrapped key under its parent and return its handle."""
        # The attributes are checked on every load, not only at import: the
        # TPM loads any key of its own, but only one with fixedTPM,
        # fixedParent, sensitiveDataOrigin and userWithAuth set, and noDA
        # clear, keeps its promises (TPM 2.0 Library Part 2, section 8.3, TPMA_OBJECT).
        public_key_of(blob)
        public, _ = TPM2B_PUBLIC.unmarshal(blob.public)
        private, _ = TPM2B_PRIVATE.unmarshal(blob.private)
        try:
            parent_handle = self._parent(blob.parent)
            # The storage key's authValue is empty and nothing in TPM2_Load
            # is secret (the private part is wrapped by the TPM), so a
            # password session does.  A TPM that loaded something else
            # fails the signature's HMAC, which covers the key's name.
            key_handle = self._context().load(parent_handle, private, public, session1=ESYS_TR.PASSWORD)
        except TSS2_Exception as exc:
            if _response_code(exc) == TPM2_RC.OBJECT_MEMORY and len(self._loaded):
                # The signing keys kept loaded for later signatures hold
                # slots that this load needs, for example on an emulator
                # that another program's storage key also uses.  They give
                # way, and the load is tried once more with none kept.
                logger.debug("out of TPM object memory; flushing %d kept signing keys", len(self._loaded))
                for handle in self._loaded.clear():
                    self._flush_quietly(handle)
                return self._load(blob)
            error = self._translate(exc, "loading the key")
            # Out of object memory is no fault of the key file, and that error's message names the fix.
            if type(error) is TpmError and _response_code(exc) != TPM2_RC.OBJECT_MEMORY:
                raise TpmKeyLoadError(
                    "the key does not load on this TPM: the key file was made on another "
                    f"TPM, or this TPM was cleared since ({exc}). The key cannot be used here",
                    rc=error.rc,
                ) from None
            raise error from None
        return key_handle

    def check_parents(self, parents: list[int]) -> None:
        """Load each storage parent, so that ``parent_check`` compares its name now."""
        with self._lock:
            try:
                self._current_context()
                parents = parents or [self._default_parent()]
            except TSS2_Exception as exc:
                raise self._translate(exc, "opening the TPM") from None
            for parent in parents:
                try:
                    self._parent(parent)
                except TSS2_Exception as exc:
                    raise self._translate(exc, f"loading the storage key ({describe_parent(parent)})") from None

    def check_loads(self, blob: TpmKeyBlob) -> None:
        """Load and flush a wrapped key, to prove it belongs to this TPM; needs no PIN."""
        public_key_of(blob)
        with self._lock:
            try:
                self._current_context()
            except TSS2_Exception as exc:
                raise self._translate(exc, "opening the TPM") from None
            self._flush_quietly(self._load(blob))

    def change_pin(self, blob: TpmKeyBlob, old_pin: bytes, new_pin: bytes) -> TpmKeyBlob:
        """Change a key's PIN with TPM2_ObjectChangeAuth and return the new blob.

        The TPM returns a new private part, wrapped by the same parent; the
        old blob keeps working with the old PIN until it is deleted, so the
        caller must replace the stored file.  The new PIN travels as the
        first command parameter, encrypted by the session.
        """
        check_pin_length(new_pin)
        public_key_of(blob)
        with self._lock:
            # A loaded copy of the key would go on taking the old PIN, and
            # without a resource manager its object slot is needed here.
            for loaded in self._loaded.discard_public(blob.public):
                self._flush_quietly(loaded)
            try:
                self._current_context()
                self._refuse_during_lockout("changing the PIN")
            except TSS2_Exception as exc:
                raise self._translate(exc, "changing the PIN") from None
            key_handle = self._load(blob)
            esapi = self._context()
            try:
                esapi.tr_set_auth(key_handle, old_pin)
                with self._esys_session(blob.parent) as session:
                    new_private = esapi.object_change_auth(
                        key_handle, self._parent(blob.parent), new_pin, session1=session
                    )
            except TSS2_Exception as exc:
                raise self._translate(exc, "changing the PIN") from None
            finally:
                self._forget_pin(key_handle)
                self._flush_quietly(key_handle)
        return TpmKeyBlob(public=blob.public, private=bytes(new_private.marshal()), parent=blob.parent)

    def _flush_quietly(self, handle: ESYS_TR) -> None:
        if self._esapi is None:
            return
        try:
            self._esapi.flush_context(handle)
        except TSS2_Exception as exc:
            logger.warning("flushing transient key handle failed: %s", exc)
