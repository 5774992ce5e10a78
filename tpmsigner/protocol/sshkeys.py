"""SSH public keys and signatures in the wire formats of RFC 4253 and RFC 5656.

The TPM returns raw curve points and raw signature integers.  This module
turns them into the blobs that OpenSSH reads, and verifies a signature
against a public key before it is given to anyone.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from asyncssh.packet import MPInt, PacketDecodeError, SSHPacket, String
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ..errors import ProtocolError


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

_CRYPTO_HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384}


@dataclass(frozen=True)
class SshPublicKey:
    """An ECDSA public key: its SSH blob and the curve point inside it."""

    curve: EcdsaCurve
    x: int
    y: int

    @property
    def key_type(self) -> str:
        return self.curve.key_type

    @property
    def blob(self) -> bytes:
        """The key in SSH wire form (RFC 5656 section 3.1)."""
        size = self.curve.coordinate_size
        point = b"\x04" + self.x.to_bytes(size, "big") + self.y.to_bytes(size, "big")
        return String(self.curve.key_type) + String(self.curve.ssh_name) + String(point)

    @property
    def fingerprint(self) -> str:
        """The ``SHA256:`` fingerprint, as ``ssh-keygen -l`` prints it."""
        return fingerprint_of_blob(self.blob)

    def openssh_line(self, comment: str) -> str:
        """The key as one line of an ``authorized_keys`` or ``.pub`` file."""
        encoded = base64.b64encode(self.blob).decode("ascii")
        return f"{self.curve.key_type} {encoded} {comment}".rstrip()

    def to_cryptography(self) -> ec.EllipticCurvePublicKey:
        numbers = ec.EllipticCurvePublicNumbers(self.x, self.y, self.curve.crypto_curve())
        return numbers.public_key()

    @classmethod
    def from_blob(cls, blob: bytes) -> "SshPublicKey":
        """Parse an SSH ECDSA key blob; raise ProtocolError on anything else."""
        try:
            packet = SSHPacket(blob)
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


def fingerprint_of_blob(blob: bytes) -> str:
    """Return the OpenSSH SHA256 fingerprint of a public key blob."""
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def digest_for_signing(key: SshPublicKey, data: bytes) -> bytes:
    """Hash ``data`` with the hash that RFC 5656 section 6.2.1 ties to the curve."""
    return hashlib.new(key.curve.hash_name, data).digest()


def encode_ecdsa_signature(key: SshPublicKey, r: int, s: int) -> bytes:
    """Build an SSH ECDSA signature blob (RFC 5656 section 3.1.2).

    r and s go in as mpints, which ``MPInt`` encodes minimally: the TPM
    returns them zero-padded to the curve size, and OpenSSH rejects a
    non-minimal mpint.
    """
    return String(key.key_type) + String(MPInt(r) + MPInt(s))


def verify_ecdsa_signature(key: SshPublicKey, data: bytes, signature_blob: bytes) -> bool:
    """Check an SSH ECDSA signature blob over ``data`` against ``key``."""
    try:
        packet = SSHPacket(signature_blob)
        key_type = packet.get_string().decode("ascii")
        inner = SSHPacket(packet.get_string())
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
