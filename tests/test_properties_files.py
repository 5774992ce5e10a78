"""Property tests of the readers of files a person or another tool may have damaged.

TSS2 key files, identity metadata, tpm.json, devices.json, signers.json,
the Noise static key, the audit log and PIN files: each reader returns a
valid result or raises its narrow error (KeyFileError, KeyStoreError,
ConfigError) with a message.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from hypothesis import example, given
from hypothesis import strategies as st
from tpm2_pytss.constants import TPM2_ECC
from tpm2_pytss.types import TPM2B_PRIVATE, TPM2B_PUBLIC

from tests.support.mutations import called_or_rejected, decoded_or_rejected, mutated, utf8_text
from tpmsigner.audit import GENESIS, OUTCOMES, AuditLog, line_hash, print_audit
from tpmsigner.errors import ConfigError, KeyFileError, KeyStoreError, TpmKeyLoadError
from tpmsigner.fsutil import read_secret_line
from tpmsigner.keyfile import LOADABLE_KEY_OID, decode_key_file, encode_key_file, read_key_file
from tpmsigner.protocol.channel import StaticKey, format_public_key
from tpmsigner.protocol.sshkeys import public_key_from_blob
from tpmsigner.signer.devices import DeviceRegistry
from tpmsigner.store import Identity, KeyStore, TpmBinding
from tpmsigner.templates import ecc_signing_key_template, rsa_signing_key_template
from tpmsigner.tpm import PARENT_OWNER, TpmKeyBlob, public_key_of
from tpmsigner_agent.config import AgentHome

# Inputs that fuzzing found, kept as files because they are long.
REGRESSIONS = Path(__file__).parent / "fuzz" / "regressions"
# JSON that json.loads rejects with something other than JSONDecodeError.
DEEPLY_NESTED_JSON = "[" * 100_000 + "]" * 100_000
HUGE_INTEGER_JSON = '{"version": ' + "1" * 5000 + "}"


@contextlib.contextmanager
def scratch_directory() -> Iterator[Path]:
    # Hypothesis runs many examples per test, and function-scoped fixtures
    # such as tmp_path would be shared between them.
    with tempfile.TemporaryDirectory(prefix="tpms-prop-") as name:
        yield Path(name)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | utf8_text(16),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(utf8_text(8), children, max_size=4),
    max_leaves=12,
)


@st.composite
def damaged_records(draw: st.DrawFn, valid: st.SearchStrategy[dict]) -> dict:
    """Return a valid record with fields removed, replaced by other JSON values, or nested ones damaged."""
    record = dict(draw(valid))
    for _ in range(draw(st.integers(1, 3))):
        if not record:
            break
        key = draw(st.sampled_from(sorted(record)))
        if draw(st.booleans()):
            del record[key]
        elif isinstance(record[key], dict) and record[key] and draw(st.booleans()):
            record[key] = draw(damaged_records(st.just(record[key])))
        else:
            record[key] = draw(json_values)
    return record


def json_documents(valid: st.SearchStrategy[dict]) -> st.SearchStrategy[bytes]:
    """Return valid documents, damaged records, other JSON, mutated text and pathological JSON."""
    encoded = valid.map(lambda record: json.dumps(record).encode("utf-8"))
    return st.one_of(
        encoded,
        damaged_records(valid).map(lambda record: json.dumps(record).encode("utf-8")),
        json_values.map(lambda value: json.dumps(value).encode("utf-8")),
        mutated(encoded),
        st.binary(max_size=64),
        st.sampled_from([DEEPLY_NESTED_JSON.encode(), HUGE_INTEGER_JSON.encode(), b"\xff\xfe{}", b""]),
    )


# ---- TSS2 PRIVATE KEY files (tpmsigner/keyfile.py, tpmsigner/tpm.py) -----


def _der(tag: int, value: bytes) -> bytes:
    if len(value) < 0x80:
        return bytes([tag, len(value)]) + value
    length = len(value).to_bytes((len(value).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + value


@st.composite
def public_areas(draw: st.DrawFn) -> bytes:
    """Return a marshalled TPM2B_PUBLIC of a signing key with random key material."""
    if draw(st.booleans()):
        template = ecc_signing_key_template(draw(st.sampled_from([TPM2_ECC.NIST_P256, TPM2_ECC.NIST_P384])))
        template.unique.ecc.x = draw(st.binary(max_size=66))
        template.unique.ecc.y = draw(st.binary(max_size=66))
    else:
        template = rsa_signing_key_template(draw(st.sampled_from([2048, 3072])))
        template.parameters.rsaDetail.exponent = draw(st.sampled_from([0, 3, 65537, 2**32 - 1]))
        template.unique.rsa = draw(st.binary(max_size=400))
    if draw(st.booleans()):
        # Any TPMA_OBJECT bits, reserved ones included.
        template.objectAttributes = draw(st.integers(0, 2**32 - 1))
    return bytes(TPM2B_PUBLIC(publicArea=template).marshal())


@st.composite
def key_file_der(draw: st.DrawFn) -> bytes:
    """Return the DER of a TPMKey, draft-bottomley-tpm2-keys section 3, with random optional fields."""
    fields = _der(0x06, draw(st.sampled_from([LOADABLE_KEY_OID, LOADABLE_KEY_OID[:-1] + b"\x04"])))
    for number in draw(st.lists(st.integers(0, 7), max_size=3)):
        if number in (0, 5):
            inner = _der(0x01, draw(st.sampled_from([b"\x00", b"\xff", b""])))
        elif number == 4:
            inner = _der(0x0C, draw(st.binary(max_size=16) | utf8_text(16).map(str.encode)))
        else:
            inner = _der(0x30, draw(st.binary(max_size=8)))
        fields += _der(0xA0 | number, inner)
    parent = draw(st.sampled_from([PARENT_OWNER, 0x81000001, 0]))
    fields += _der(0x02, draw(st.just(parent.to_bytes(5, "big").lstrip(b"\0") or b"\0") | st.binary(max_size=6)))
    fields += _der(0x04, draw(public_areas() | st.binary(max_size=32)))
    fields += _der(0x04, bytes(TPM2B_PRIVATE(draw(st.binary(max_size=64))).marshal()))
    return _der(0x30, fields)


def armored(der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN TSS2 PRIVATE KEY-----\n" + body + b"-----END TSS2 PRIVATE KEY-----\n"


def _key_file_with_p256_x(x: bytes) -> bytes:
    template = ecc_signing_key_template(TPM2_ECC.NIST_P256)
    template.unique.ecc.x = x
    template.unique.ecc.y = b"\x01" * 32
    public = bytes(TPM2B_PUBLIC(publicArea=template).marshal())
    return encode_key_file(TpmKeyBlob(public, bytes(TPM2B_PRIVATE(b"p" * 16).marshal()), PARENT_OWNER))


key_files = st.one_of(key_file_der().map(armored), mutated(key_file_der()).map(armored))


@given(st.one_of(key_files, mutated(key_file_der().map(armored)), st.binary(max_size=128)))
@example(armored(_der(0x30, _der(0x06, LOADABLE_KEY_OID) + _der(0x02, b"\x01")))).via("no public part")
@example(_key_file_with_p256_x(b"\x01" * 40)).via("a 40-byte P-256 coordinate: OverflowError when encoded")
@example((REGRESSIONS / "key-file-reserved-attribute-bits.pem").read_bytes()).via(
    "found by atheris: reserved TPMA_OBJECT bits made the error message itself raise ValueError"
)
def test_key_file_gives_usable_key_or_narrow_error(pem: bytes) -> None:
    key_file = decoded_or_rejected(read_key_file, pem, (KeyFileError,))
    if key_file is None:
        return

    # A file the reader accepts yields a usable public key, or a narrow
    # error that explains why the key cannot be used.
    key = decoded_or_rejected(public_key_of, key_file.blob, (KeyFileError, TpmKeyLoadError))
    if key is not None:
        assert public_key_from_blob(key.blob) == key


@given(public_areas(), st.binary(min_size=1, max_size=64), st.sampled_from([PARENT_OWNER, 0x81000001]))
def test_key_file_round_trip(public: bytes, private: bytes, parent: int) -> None:
    blob = TpmKeyBlob(public=public, private=bytes(TPM2B_PRIVATE(private).marshal()), parent=parent)

    assert decode_key_file(encode_key_file(blob)) == blob


# ---- identity metadata and tpm.json (tpmsigner/store.py) ------------------

METADATA_KEY = ec.generate_private_key(ec.SECP256R1())
METADATA_BLOB = (
    b"\x00\x00\x00\x13ecdsa-sha2-nistp256\x00\x00\x00\x08nistp256\x00\x00\x00\x41"
    + METADATA_KEY.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
)
METADATA_IDENTITY = Identity.from_json(
    {
        "version": 1,
        "label": "work",
        "key_type": "ecdsa-p256",
        "public_key_blob": base64.b64encode(METADATA_BLOB).decode(),
        "fingerprint": public_key_from_blob(METADATA_BLOB).fingerprint,
        "created": "2024-01-01T00:00:00+00:00",
        "enabled": True,
    },
    "built-in record",
)

metadata_records = st.builds(
    lambda enabled, last_used, description, host_keys: {
        **METADATA_IDENTITY.to_json(),
        "enabled": enabled,
        "last_used": last_used,
        "description": description,
        "allowed_host_keys": host_keys,
    },
    st.booleans(),
    st.none() | utf8_text(32),
    st.none() | utf8_text(32),
    st.lists(st.just("SHA256:abc") | utf8_text(8), max_size=3),
)


@given(json_documents(metadata_records))
@example(DEEPLY_NESTED_JSON.encode()).via("nesting deeper than the recursion limit")
@example(HUGE_INTEGER_JSON.encode()).via("integer over 4300 digits")
@example(json.dumps({**METADATA_IDENTITY.to_json(), "public_key_blob": "AAAA", "fingerprint": "SHA256:"}).encode())
def test_identity_metadata_bad_input(document: bytes) -> None:
    with scratch_directory() as home:
        (home / "keys").mkdir()
        (home / "keys" / "work.json").write_bytes(document)
        store = KeyStore(home)

        identity = decoded_or_rejected(store.get, "work", (KeyStoreError,))
        listed = called_or_rejected(store.list, (KeyStoreError,))

    assert (identity is None) == (listed is None)
    if identity is not None:
        assert listed == [identity]
        assert identity.openssh_line().endswith(" work")
        assert identity.to_display()["fingerprint"] == identity.fingerprint


tpm_binding_records = st.builds(
    lambda parents: {"version": 1, "parents": parents},
    st.dictionaries(st.sampled_from(["0x81000001", "0x40000001"]), st.binary(min_size=1, max_size=8).map(bytes.hex)),
)


@given(json_documents(tpm_binding_records))
@example(DEEPLY_NESTED_JSON.encode())
@example(b'{"version": 1, "parents": {"0x81000001": {"a": 1}}}').via("a name that is not a string")
def test_tpm_binding_file_bad_input(document: bytes) -> None:
    with scratch_directory() as home:
        (home / "tpm.json").write_bytes(document)
        recorded = called_or_rejected(TpmBinding(home).recorded, (KeyStoreError,))

    if recorded is not None:
        assert all(isinstance(key, str) and isinstance(value, str) for key, value in recorded.items())


# ---- devices.json and signers.json ----------------------------------------

NOISE_KEYS = [format_public_key(bytes([number]) * 32) for number in range(1, 4)]

devices_records = st.builds(
    lambda version, devices: {"version": version, "devices": devices},
    st.sampled_from([1, 2]),
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True),
        st.sampled_from(NOISE_KEYS)
        | st.fixed_dictionaries(
            {"key": st.sampled_from(NOISE_KEYS)},
            optional={"paired": utf8_text(8), "last_seen": utf8_text(8), "last_address": utf8_text(8)},
        ),
        max_size=3,
    ),
)


@given(json_documents(devices_records))
@example(DEEPLY_NESTED_JSON.encode())
@example(HUGE_INTEGER_JSON.encode())
def test_devices_file_gives_devices_or_config_error(document: bytes) -> None:
    with scratch_directory() as home:
        (home / "devices.json").write_bytes(document)
        devices = called_or_rejected(DeviceRegistry(home / "devices.json").load, (ConfigError,))

    if devices is not None:
        for device in devices:
            assert len(device.public_key) == 32
            assert all(value is None or isinstance(value, str) for value in (device.paired, device.last_seen))


signers_records = st.builds(
    lambda signers: {"version": 1, "signers": signers},
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True),
        st.fixed_dictionaries(
            {
                "address": st.sampled_from(["mdns", "-", "127.0.0.1:7810", "[::1]:22", "[fe80::1]:1", "host:99999"])
                | utf8_text(16),
                "key": st.sampled_from(NOISE_KEYS) | utf8_text(16),
            }
        ),
        max_size=3,
    ),
)


@given(json_documents(signers_records))
@example(json.dumps({"version": 1, "signers": {"s": {"address": "h:" + "1" * 5000, "key": NOISE_KEYS[0]}}}).encode())
@example(DEEPLY_NESTED_JSON.encode())
def test_signers_file_gives_signers_or_config_error(document: bytes) -> None:
    with scratch_directory() as home:
        (home / "signers.json").write_bytes(document)
        signers = called_or_rejected(AgentHome(home).signers, (ConfigError,))

    if signers is not None:
        for signer in signers:
            assert signer.uses_mdns or 1 <= signer.port <= 65535
            assert len(signer.public_key) == 32


# ---- the Noise static key, PIN files, the audit log -----------------------


def _pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


PRIVATE_KEY_PEMS = [
    _pem(x25519.X25519PrivateKey.generate()),
    _pem(ed25519.Ed25519PrivateKey.generate()),
    _pem(ec.generate_private_key(ec.SECP256R1())),
]


def _rearmored(pem: bytes, der: bytes) -> bytes:
    """Return ``pem`` with its body replaced by ``der``, keeping the armour lines."""
    lines = pem.splitlines()
    return b"\n".join([lines[0], base64.encodebytes(der).strip(), lines[-1]]) + b"\n"


@st.composite
def damaged_pems(draw: st.DrawFn) -> bytes:
    pem = draw(st.sampled_from(PRIVATE_KEY_PEMS))
    der = base64.b64decode(b"".join(pem.splitlines()[1:-1]))
    return _rearmored(pem, draw(mutated(st.just(der))))


@given(st.one_of(st.sampled_from(PRIVATE_KEY_PEMS), damaged_pems(), mutated(st.sampled_from(PRIVATE_KEY_PEMS))))
@example(
    b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDAGVuBCIEICC4TAgLhKYzGCoAbFlalwwyqzMqaa+8iyapNPAZcENN\n-----END PRIVATE KEY-----\n"
).via("an X25519 key whose algorithm OID lost a byte: cryptography raises UnsupportedAlgorithm")
@example(
    b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VxBCIEICC4TAgLhKYzGCoAbFlalwwyqzMqaa+8iyapNPAZcENN\n-----END PRIVATE KEY-----\n"
).via("found by atheris: a 32-byte Ed448 key, for which cryptography raises InternalError")
def test_noise_key_file_loads_or_gives_config_error(pem: bytes) -> None:
    with scratch_directory() as home:
        (home / "key.pem").write_bytes(pem)
        key = decoded_or_rejected(StaticKey.load_or_create, home / "key.pem", (ConfigError,))

    if key is not None:
        assert len(key.private) == 32
        assert len(key.public) == 32


@given(st.binary(max_size=200))
def test_pin_file_gives_text_or_config_error(content: bytes) -> None:
    with scratch_directory() as home:
        (home / "pin").write_bytes(content)
        pin = decoded_or_rejected(read_secret_line, home / "pin", (ConfigError,))

    if pin is not None:
        assert "\n" not in pin
        assert content.startswith(pin.encode("utf-8"))


audit_records = st.fixed_dictionaries(
    {
        "time": st.sampled_from(["2024-05-01T10:00:00+00:00", "2024-05-01T10:00:00", "yesterday"]),
        "outcome": st.sampled_from(OUTCOMES),
    },
    optional={"destination": json_values, "reason": json_values, "purpose": json_values, "device": json_values},
)


@st.composite
def chained_audit_logs(draw: st.DrawFn) -> tuple[bytes, list[dict]]:
    """Return a correctly chained log and the records written to it."""
    records = draw(st.lists(audit_records, max_size=4))
    lines = []
    previous = GENESIS
    for record in records:
        line = json.dumps({**record, "prev": previous}, sort_keys=True, separators=(",", ":")).encode()
        previous = line_hash(line)
        lines.append(line)
    return b"".join(line + b"\n" for line in lines), records


@st.composite
def audit_logs(draw: st.DrawFn) -> bytes:
    """Return a correctly chained log, or one with damaged lines."""
    document, _ = draw(chained_audit_logs())
    return draw(st.just(document) | mutated(st.just(document)))


@given(chained_audit_logs())
def test_chained_audit_log_verifies_and_reads_back(case: tuple[bytes, list[dict]]) -> None:
    document, written = case
    with scratch_directory() as home:
        (home / "audit.jsonl").write_bytes(document)
        log = AuditLog(home / "audit.jsonl")
        result = log.verify()
        records = log.records()

    assert result.ok, result.reason
    assert result.lines == len(written)
    assert [{key: value for key, value in record.items() if key != "prev"} for record in records] == written


@given(
    st.one_of(
        audit_logs(),
        json_documents(audit_records),
        st.sampled_from([b"[1]\n", b"7\n", DEEPLY_NESTED_JSON.encode() + b"\n"]),
    )
)
@example(b"[1]\n").via("a line that is JSON but not an object")
@example(b'{"":"","outcome":null}').via("an outcome that is not a string")
@example(b'{"time":"2024-05-01T10:00:00","outcome":"denied"}\n').via("a time without a zone, compared with --since")
@example(b'{"prev": "' + b"0" * 64 + b'"}\n\xff\n').via("a line that is not UTF-8")
def test_audit_log_bad_input(document: bytes) -> None:
    with scratch_directory() as home:
        (home / "audit.jsonl").write_bytes(document)
        log = AuditLog(home / "audit.jsonl")
        result = log.verify()
        records = called_or_rejected(log.records, (ConfigError,))

    if records is None:
        # A line that records() cannot read also breaks the chain.
        assert not result.ok
    if result.ok:
        # A log whose chain holds is readable, one record per line.
        assert records is not None
        assert len(records) == result.lines

    if records is not None:
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            print_audit(records)
            print_audit(records, since="2024-01-01", as_json=True)
        assert output.getvalue().count("\n") >= len(records)
