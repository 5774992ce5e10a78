"""The ``TSS2 PRIVATE KEY`` PEM format (draft-bottomley-tpm2-keys).

The ASN.1 structure, from section 3 of that draft::

    TPMKey ::= SEQUENCE {
        type        OBJECT IDENTIFIER,               -- 2.23.133.10.1.3, loadable key
        emptyAuth   [0] EXPLICIT BOOLEAN OPTIONAL,
        policy      [1] EXPLICIT SEQUENCE OF TPMPolicy OPTIONAL,
        secret      [2] EXPLICIT OCTET STRING OPTIONAL,
        authPolicy  [3] EXPLICIT SEQUENCE OF TPMAuthPolicy OPTIONAL,
        description [4] EXPLICIT UTF8String OPTIONAL,
        rsaParent   [5] EXPLICIT BOOLEAN OPTIONAL,
        parent      INTEGER,
        pubkey      OCTET STRING,                    -- TPM2B_PUBLIC
        privkey     OCTET STRING                     -- TPM2B_PRIVATE
    }

Writing goes through tpm2-pytss's ``TSSPrivKey``.  Reading uses the small
DER reader below, because files from other tools (ssh-tpm-agent's ``.tpm``
files among them) carry optional fields that ``TSSPrivKey`` does not accept.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import TPM2B_PRIVATE, TPM2B_PUBLIC

from .errors import KeyFileError
from .tpm import TpmKeyBlob

PEM_BEGIN = b"-----BEGIN TSS2 PRIVATE KEY-----"
PEM_END = b"-----END TSS2 PRIVATE KEY-----"
LOADABLE_KEY_OID = bytes([0x67, 0x81, 0x05, 0x0A, 0x01, 0x03])   # 2.23.133.10.1.3

_TAG_BOOLEAN = 0x01
_TAG_INTEGER = 0x02
_TAG_OCTET_STRING = 0x04
_TAG_UTF8_STRING = 0x0C
_TAG_OID = 0x06
_TAG_SEQUENCE = 0x30
_CONTEXT_CONSTRUCTED = 0xA0
_FIELD_EMPTY_AUTH, _FIELD_POLICY, _FIELD_SECRET, _FIELD_AUTH_POLICY, _FIELD_DESCRIPTION, _FIELD_RSA_PARENT = range(6)


@dataclass(frozen=True)
class KeyFile:
    """A parsed key file: the wrapped key and the optional description."""

    blob: TpmKeyBlob
    description: str | None = None


def encode_key_file(blob: TpmKeyBlob) -> bytes:
    """Return the PEM text of a wrapped key whose use needs a PIN."""
    public, _ = TPM2B_PUBLIC.unmarshal(blob.public)
    private, _ = TPM2B_PRIVATE.unmarshal(blob.private)
    return TSSPrivKey(private, public, empty_auth=False, parent=blob.parent).to_pem()


def decode_key_file(pem: bytes, source: str = "key file") -> TpmKeyBlob:
    """Parse PEM text into a TpmKeyBlob; ``source`` names the file in errors."""
    return read_key_file(pem, source).blob


def read_key_file(pem: bytes, source: str = "key file") -> KeyFile:
    """Parse PEM text, keeping the optional description."""
    der = _unarmor(pem, source)
    try:
        return _parse_tpm_key(der, source)
    except (IndexError, ValueError) as exc:
        raise KeyFileError(f"{source} is not a valid TSS2 PRIVATE KEY: {exc}") from None


def _unarmor(pem: bytes, source: str) -> bytes:
    begin = pem.find(PEM_BEGIN)
    end = pem.find(PEM_END, begin + 1)
    if begin < 0 or end < 0:
        raise KeyFileError(f"{source} is not a TSS2 PRIVATE KEY PEM file")
    body = pem[begin + len(PEM_BEGIN) : end]
    try:
        return base64.b64decode(b"".join(body.split()), validate=True)
    except binascii.Error:
        raise KeyFileError(f"{source}: the PEM body is not valid base64") from None


class _DerReader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def at_end(self) -> bool:
        return self.offset >= len(self.data)

    def peek_tag(self) -> int:
        return self.data[self.offset]

    def read(self, expected_tag: int) -> bytes:
        tag = self.data[self.offset]
        if tag != expected_tag:
            raise ValueError(f"expected DER tag 0x{expected_tag:02x} at offset {self.offset}, found 0x{tag:02x}")
        length = self.data[self.offset + 1]
        position = self.offset + 2
        if length & 0x80:
            count = length & 0x7F
            if count == 0 or count > 4:
                raise ValueError(f"unsupported DER length encoding at offset {self.offset}")
            length = int.from_bytes(self.data[position : position + count], "big")
            position += count
        if position + length > len(self.data):
            raise ValueError(f"DER value at offset {self.offset} runs past the end of the data")
        self.offset = position + length
        return self.data[position : position + length]


def _parse_tpm_key(der: bytes, source: str) -> KeyFile:
    outer = _DerReader(der)
    fields = _DerReader(outer.read(_TAG_SEQUENCE))
    if not outer.at_end():
        raise ValueError("trailing data after the key structure")

    if fields.read(_TAG_OID) != LOADABLE_KEY_OID:
        raise KeyFileError(
            f"{source} is not a loadable key (OID 2.23.133.10.1.3); importable and sealed keys are not supported"
        )

    empty_auth = False
    description = None
    while not fields.at_end() and fields.peek_tag() & 0xE0 == _CONTEXT_CONSTRUCTED:
        field_number = fields.peek_tag() & 0x1F
        inner = _DerReader(fields.read(fields.peek_tag()))
        if field_number == _FIELD_EMPTY_AUTH:
            empty_auth = inner.read(_TAG_BOOLEAN) != b"\x00"
        elif field_number in (_FIELD_POLICY, _FIELD_AUTH_POLICY, _FIELD_SECRET):
            raise KeyFileError(
                f"{source} binds the key to a TPM policy or an imported secret, which tpmsigner "
                "does not support; only keys authorised by a PIN can be used"
            )
        elif field_number == _FIELD_DESCRIPTION:
            description = inner.read(_TAG_UTF8_STRING).decode("utf-8")
        elif field_number == _FIELD_RSA_PARENT:
            if inner.read(_TAG_BOOLEAN) != b"\x00":
                raise KeyFileError(f"{source} has an RSA parent, which tpmsigner does not support")
        else:
            raise ValueError(f"unknown optional field [{field_number}]")

    parent_bytes = fields.read(_TAG_INTEGER)
    if not parent_bytes or parent_bytes[0] & 0x80:
        raise ValueError("the parent handle is not a positive integer")
    parent = int.from_bytes(parent_bytes, "big")
    public = fields.read(_TAG_OCTET_STRING)
    private = fields.read(_TAG_OCTET_STRING)
    if not fields.at_end():
        raise ValueError("unexpected fields after the private key")

    if empty_auth:
        raise KeyFileError(
            f"{source} is a key with an empty authorisation value; tpmsigner only "
            "uses keys that need a PIN for every signature"
        )
    try:
        _, public_used = TPM2B_PUBLIC.unmarshal(public)
        _, private_used = TPM2B_PRIVATE.unmarshal(private)
    except Exception as exc:  # noqa: BLE001 - tpm2-pytss raises several types on bad input
        raise KeyFileError(f"{source}: the public or private part does not parse: {exc}") from None
    if public_used != len(public) or private_used != len(private):
        raise KeyFileError(f"{source}: trailing bytes after the public or private part")

    return KeyFile(TpmKeyBlob(public=public, private=private, parent=parent), description)
