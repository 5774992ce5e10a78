"""The key types tpmsigner creates, by the names the command line uses."""

from __future__ import annotations

from dataclasses import dataclass

from .protocol.sshkeys import NISTP256, NISTP384, EcdsaCurve


@dataclass(frozen=True)
class KeyType:
    """A kind of TPM key: an ECDSA curve, or an RSA modulus size."""

    name: str                        # "ecdsa-p256", "rsa-3072", ...
    curve: EcdsaCurve | None = None  # set for ECDSA
    rsa_bits: int | None = None      # set for RSA

    @property
    def is_rsa(self) -> bool:
        return self.rsa_bits is not None

    @property
    def description(self) -> str:
        if self.curve is not None:
            return f"ECDSA {self.curve.ssh_name.replace('nistp', 'P-')}"
        return f"RSA {self.rsa_bits}-bit"


ECDSA_P256 = KeyType("ecdsa-p256", curve=NISTP256)
ECDSA_P384 = KeyType("ecdsa-p384", curve=NISTP384)
RSA_2048 = KeyType("rsa-2048", rsa_bits=2048)
RSA_3072 = KeyType("rsa-3072", rsa_bits=3072)

KEY_TYPES = {key_type.name: key_type for key_type in (ECDSA_P256, ECDSA_P384, RSA_2048, RSA_3072)}
DEFAULT_KEY_TYPE = ECDSA_P256


def key_type_by_name(name: str) -> KeyType:
    """Return the KeyType called ``name``; raise ValueError naming the valid ones."""
    try:
        return KEY_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown key type {name!r}: use one of {', '.join(KEY_TYPES)}") from None
