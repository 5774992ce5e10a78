"""SSH public keys and signatures in the wire formats of RFC 4253, RFC 5656 and RFC 8332.

The TPM returns raw curve points, raw moduli and raw signature values.  This
module turns them into the blobs that OpenSSH reads, and verifies a
signature against a public key before it is given to anyone.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from .sshwire import MPInt, PacketDecodeError, SshReader, String
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ..errors import ProtocolError

# Signature flags of SSH_AGENTC_SIGN_REQUEST (draft-miller-ssh-agent
# section 4.5.1); they only matter for RSA keys.
SSH_AGENT_RSA_SHA2_256 = 2
SSH_AGENT_RSA_SHA2_512 = 4

RSA_KEY_TYPE = "ssh-rsa"
RSA_MIN_MODULUS_BITS = 1024
RSA_MAX_MODULUS_BITS = 16384


@dataclass(frozen=True)
class EcdsaCurve:
    """An ECDSA curve as SSH names it (RFC 5656 section 6.1)."""

    ssh_name: str           # "nistp256"
    key_type: str           # "ecdsa-sha2-nistp256"
    coordinate_size: int    # bytes per coordinate
    hash_name: str          # hash that RFC 5656 section 6.2.1 pairs with the curve
    crypto_curve: type[ec.EllipticCurve]


NISTP256 = EcdsaCurve("nistp256", "ecdsa-sha2-nistp256", 32, "sha256", ec.SECP256R1)
NISTP384 = EcdsaCurve("nistp384", "ecdsa-sha2-nistp384", 48, "sha384", ec.SECP384R1)

CURVES_BY_KEY_TYPE = {curve.key_type: curve for curve in (NISTP256, NISTP384)}

_CRYPTO_HASHES = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


@dataclass(frozen=True)
class SignatureScheme:
    """The SSH signature algorithm name and the hash it signs."""

    algorithm: str     # "ecdsa-sha2-nistp256", "rsa-sha2-512", ...
    hash_name: str     # hashlib name: "sha256", "sha512", ...


# RSA signature algorithms of RFC 8332 section 3, and the original ssh-rsa.
RSA_SHA2_256 = SignatureScheme("rsa-sha2-256", "sha256")
RSA_SHA2_512 = SignatureScheme("rsa-sha2-512", "sha512")
RSA_SHA1 = SignatureScheme("ssh-rsa", "sha1")
_RSA_SCHEMES = {scheme.algorithm: scheme for scheme in (RSA_SHA2_256, RSA_SHA2_512, RSA_SHA1)}


class _PublicKeyText:
    """Text forms shared by every key class; each subclass provides ``blob``."""

    blob: bytes
    key_type: str

    @property
    def fingerprint(self) -> str:
        """The ``SHA256:`` fingerprint, as ``ssh-keygen -l`` prints it."""
        return fingerprint_of_blob(self.blob)

    def openssh_line(self, comment: str) -> str:
        """Format the key as one line of an ``authorized_keys`` or ``.pub`` file."""
        encoded = base64.b64encode(self.blob).decode("ascii")
        return f"{self.key_type} {encoded} {comment}".rstrip()


@dataclass(frozen=True)
class EcdsaPublicKey(_PublicKeyText):
    """An ECDSA public key: the curve and the point."""

    curve: EcdsaCurve
    x: int
    y: int

    @property
    def key_type(self) -> str:  # type: ignore[override]
        return self.curve.key_type

    @property
    def blob(self) -> bytes:  # type: ignore[override]
        """The key in SSH wire form (RFC 5656 section 3.1)."""
        size = self.curve.coordinate_size
        point = b"\x04" + self.x.to_bytes(size, "big") + self.y.to_bytes(size, "big")
        return String(self.curve.key_type) + String(self.curve.ssh_name) + String(point)

    def to_cryptography(self) -> ec.EllipticCurvePublicKey:
        numbers = ec.EllipticCurvePublicNumbers(self.x, self.y, self.curve.crypto_curve())
        return numbers.public_key()

    @classmethod
    def from_blob(cls, blob: bytes) -> "EcdsaPublicKey":
        """Parse an SSH ECDSA key blob; raise ProtocolError on anything else."""
        try:
            packet = SshReader(blob)
            key_type = packet.get_string().decode("ascii")
            curve = CURVES_BY_KEY_TYPE.get(key_type)
            if curve is None:
                raise ProtocolError(f"unsupported SSH key type {key_type!r}")
            curve_name = packet.get_string().decode("ascii")
            point = packet.get_string()
            packet.check_end()
        except (PacketDecodeError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"malformed SSH public key blob: {exc}") from None

        size = curve.coordinate_size
        if curve_name != curve.ssh_name:
            raise ProtocolError(f"curve {curve_name!r} does not match key type {key_type!r}")
        if len(point) != 1 + 2 * size or point[0] != 4:
            raise ProtocolError("ECDSA public key is not an uncompressed point of the right size")

        key = cls(curve, int.from_bytes(point[1 : 1 + size], "big"), int.from_bytes(point[1 + size :], "big"))
        try:
            key.to_cryptography()
        except ValueError:
            raise ProtocolError("ECDSA public key point is not on its curve") from None
        return key


@dataclass(frozen=True)
class RsaPublicKey(_PublicKeyText):
    """An RSA public key: modulus and public exponent."""

    n: int
    e: int

    key_type = RSA_KEY_TYPE

    @property
    def bits(self) -> int:
        return self.n.bit_length()

    @property
    def blob(self) -> bytes:  # type: ignore[override]
        """The key in SSH wire form (RFC 4253 section 6.6): e before n."""
        return String(RSA_KEY_TYPE) + MPInt(self.e) + MPInt(self.n)

    def to_cryptography(self) -> rsa.RSAPublicKey:
        return rsa.RSAPublicNumbers(self.e, self.n).public_key()

    @classmethod
    def from_blob(cls, blob: bytes) -> "RsaPublicKey":
        try:
            packet = SshReader(blob)
            key_type = packet.get_string().decode("ascii")
            if key_type != RSA_KEY_TYPE:
                raise ProtocolError(f"unsupported SSH key type {key_type!r}")
            e = packet.get_mpint()
            n = packet.get_mpint()
            packet.check_end()
        except (PacketDecodeError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"malformed SSH public key blob: {exc}") from None
        # OpenSSH accepts moduli of 1024 to 16384 bits (SSH_RSA_MINIMUM_MODULUS_SIZE
        # and SSH_RSA_MAXIMUM_MODULUS_SIZE in ssh.h).  RFC 8017 section 3.1
        # wants an odd modulus and an odd exponent from 3 to n - 1.
        if not RSA_MIN_MODULUS_BITS <= n.bit_length() <= RSA_MAX_MODULUS_BITS:
            raise ProtocolError(
                f"RSA public key has a {n.bit_length()}-bit modulus; "
                f"{RSA_MIN_MODULUS_BITS} to {RSA_MAX_MODULUS_BITS} bits are supported"
            )
        if n % 2 == 0 or e < 3 or e % 2 == 0 or e >= n:
            raise ProtocolError(
                "RSA public key is invalid: the modulus must be odd, and the exponent odd, at least 3 "
                "and below the modulus"
            )
        key = cls(n, e)
        try:
            key.to_cryptography()
        except ValueError as exc:
            raise ProtocolError(f"RSA public key is invalid: {exc}") from None
        return key


SshPublicKey = EcdsaPublicKey | RsaPublicKey


@dataclass(frozen=True)
class CertifiedKeyType:
    """The plain key type inside a certificate type, and how many fields it has."""

    key_type: str       # "ecdsa-sha2-nistp256", "ssh-rsa"
    field_count: int    # strings or mpints after the type name in the plain key blob


# The certificate types of PROTOCOL.certkeys for the key types tpmsigner
# holds: an ECDSA key is curve name and point, an RSA key is e and n.
CERTIFICATE_KEY_TYPES = {
    "ecdsa-sha2-nistp256-cert-v01@openssh.com": CertifiedKeyType("ecdsa-sha2-nistp256", 2),
    "ecdsa-sha2-nistp384-cert-v01@openssh.com": CertifiedKeyType("ecdsa-sha2-nistp384", 2),
    "ssh-rsa-cert-v01@openssh.com": CertifiedKeyType(RSA_KEY_TYPE, 2),
}


def public_key_from_blob(blob: bytes) -> SshPublicKey:
    """Parse an ECDSA or RSA SSH key blob; raise ProtocolError for anything else."""
    try:
        key_type = SshReader(blob).get_string()
    except PacketDecodeError as exc:
        raise ProtocolError(f"malformed SSH public key blob: {exc}") from None
    if key_type == RSA_KEY_TYPE.encode():
        return RsaPublicKey.from_blob(blob)
    return EcdsaPublicKey.from_blob(blob)


def fingerprint_of_blob(blob: bytes) -> str:
    """Return the OpenSSH SHA256 fingerprint of a public key blob.

    A certificate's fingerprint is that of the key it certifies, as
    ``ssh-keygen -l`` and ``ssh-add -l`` print it (OpenSSH 9.2 hashes the
    plain key of a certificate).  A blob that does not parse is hashed as it is.
    """
    certified = certified_key_blob(blob)
    digest = hashlib.sha256(blob if certified is None else certified).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def certified_key_blob(blob: bytes) -> bytes | None:
    """Return the plain key blob inside an OpenSSH certificate blob, or None for anything else.

    PROTOCOL.certkeys: a certificate starts with its type and a nonce, then
    the fields of the certified key in the order of the plain key blob.
    Only the key types in CERTIFICATE_KEY_TYPES are recognised, and nothing
    after the key fields is checked here.
    """
    try:
        packet = SshReader(blob)
        certificate_type = packet.get_string().decode("ascii")
        certified = CERTIFICATE_KEY_TYPES.get(certificate_type)
        if certified is None:
            return None
        packet.get_string()                 # nonce
        fields = [packet.get_string() for _ in range(certified.field_count)]
    except (PacketDecodeError, UnicodeDecodeError):
        return None
    return String(certified.key_type) + b"".join(String(field) for field in fields)


def signature_scheme(key: SshPublicKey, flags: int = 0) -> SignatureScheme:
    """Choose the signature algorithm for ``key`` and the agent request's flags.

    ECDSA keys have one algorithm each and ignore the flags.  For RSA,
    SSH_AGENT_RSA_SHA2_256 wins over SSH_AGENT_RSA_SHA2_512 when both are
    set, as in OpenSSH's ssh-agent, and no flag means the SHA-1 ``ssh-rsa``.
    """
    if isinstance(key, EcdsaPublicKey):
        return SignatureScheme(key.key_type, key.curve.hash_name)
    if flags & SSH_AGENT_RSA_SHA2_256:
        return RSA_SHA2_256
    if flags & SSH_AGENT_RSA_SHA2_512:
        return RSA_SHA2_512
    return RSA_SHA1


def digest_for_signing(key: SshPublicKey, data: bytes, flags: int = 0) -> bytes:
    """Hash ``data`` with the hash of the scheme that ``key`` and ``flags`` select."""
    return hashlib.new(signature_scheme(key, flags).hash_name, data).digest()


def encode_ecdsa_signature(key: EcdsaPublicKey, r: int, s: int) -> bytes:
    """Build an SSH ECDSA signature blob (RFC 5656 section 3.1.2).

    r and s go in as mpints, which ``MPInt`` encodes minimally: the TPM
    returns them zero-padded to the curve size, and OpenSSH rejects a
    non-minimal mpint.
    """
    return String(key.key_type) + String(MPInt(r) + MPInt(s))


def encode_rsa_signature(key: RsaPublicKey, scheme: SignatureScheme, signature: bytes) -> bytes:
    """Build an SSH RSA signature blob (RFC 8332 section 3).

    The signature is left-padded to the modulus length, which RFC 8332
    requires and some servers check.
    """
    size = (key.bits + 7) // 8
    if len(signature) > size:
        raise ValueError(f"RSA signature of {len(signature)} bytes is longer than the {size}-byte modulus")
    return String(scheme.algorithm) + String(signature.rjust(size, b"\0"))


def verify_signature(key: SshPublicKey, data: bytes, signature_blob: bytes) -> bool:
    """Check an SSH signature blob over ``data`` against ``key``."""
    if isinstance(key, EcdsaPublicKey):
        return verify_ecdsa_signature(key, data, signature_blob)
    return verify_rsa_signature(key, data, signature_blob)


def verify_ecdsa_signature(key: EcdsaPublicKey, data: bytes, signature_blob: bytes) -> bool:
    """Check an SSH ECDSA signature blob over ``data`` against ``key``."""
    try:
        packet = SshReader(signature_blob)
        key_type = packet.get_string().decode("ascii")
        inner = SshReader(packet.get_string())
        packet.check_end()
        r = inner.get_mpint()
        s = inner.get_mpint()
        inner.check_end()
    except (PacketDecodeError, UnicodeDecodeError):
        return False

    if key_type != key.key_type or r <= 0 or s <= 0:
        return False

    hash_class = _CRYPTO_HASHES[key.curve.hash_name]
    try:
        key.to_cryptography().verify(encode_dss_signature(r, s), data, ec.ECDSA(hash_class()))
    except InvalidSignature:
        return False
    return True


def verify_rsa_signature(key: RsaPublicKey, data: bytes, signature_blob: bytes) -> bool:
    """Check an SSH RSA signature blob (any of the three algorithms) over ``data``."""
    try:
        packet = SshReader(signature_blob)
        algorithm = packet.get_string().decode("ascii")
        signature = packet.get_string()
        packet.check_end()
    except (PacketDecodeError, UnicodeDecodeError):
        return False

    scheme = _RSA_SCHEMES.get(algorithm)
    if scheme is None:
        return False
    try:
        key.to_cryptography().verify(signature, data, padding.PKCS1v15(), _CRYPTO_HASHES[scheme.hash_name]())
    except InvalidSignature:
        return False
    return True
