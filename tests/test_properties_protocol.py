"""Property tests of the wire decoders: the signer protocol, the agent's ssh-agent
messages, session binding, signed data, SSH keys and pairing messages.

Each decoder must return a valid result or raise its module's narrow error
(ProtocolError for wire formats) with a message, for any input.  Encoders
and decoders must round-trip.
"""

from __future__ import annotations

import functools
import struct

import asyncssh
from asyncssh.packet import Boolean, Byte, MPInt, String, UInt32
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import example, given
from hypothesis import strategies as st

from tests.support.mutations import bad_input, decoded_or_rejected, mutated, ssh_strings, utf8_text
from tpmsigner import pairing
from tpmsigner.discovery import TxtRecord, parse_txt
from tpmsigner.errors import ProtocolError
from tpmsigner.protocol.messages import (
    Failure,
    FailureCode,
    ListedIdentity,
    ListReply,
    ListRequest,
    ProcessInfo,
    SignReply,
    SignRequest,
    decode_message,
    encode_message,
    request_id_of,
)
from tpmsigner.protocol.sessionbind import (
    ALLOWED_HOST_KEY_SIGNATURES,
    BindingEvidence,
    SessionBind,
    decode_evidence,
    decode_session_bind,
    encode_evidence,
    encode_session_bind,
    verify_session_bind,
)
from tpmsigner.protocol.signeddata import (
    PURPOSE_SSH_LOGIN,
    PURPOSE_UNKNOWN,
    SSHSIG_PURPOSE_PREFIX,
    describe_signed_data,
)
from tpmsigner.protocol.sshkeys import (
    NISTP256,
    NISTP384,
    RSA_SHA2_256,
    RSA_SHA2_512,
    EcdsaPublicKey,
    RsaPublicKey,
    encode_ecdsa_signature,
    encode_rsa_signature,
    public_key_from_blob,
    verify_signature,
)
from tpmsigner_agent import wire

uint32 = st.integers(0, 2**32 - 1)
blobs = st.binary(max_size=96)

# ---- the signer protocol (tpmsigner/protocol/messages.py) ----------------

process_infos = st.builds(ProcessInfo, uint32, uint32, utf8_text(), utf8_text())
session_binds = st.builds(SessionBind, blobs, blobs, blobs, st.booleans())
evidences = st.builds(BindingEvidence, session_binds, st.booleans(), utf8_text(), st.booleans())

messages = st.one_of(
    st.builds(ListRequest, uint32),
    st.builds(
        ListReply, uint32, st.lists(st.builds(ListedIdentity, blobs, utf8_text()), max_size=4).map(tuple)
    ),
    st.builds(SignRequest, uint32, blobs, blobs, uint32, process_infos, st.none() | evidences),
    st.builds(SignReply, uint32, blobs),
    st.builds(Failure, uint32, st.sampled_from(FailureCode), utf8_text()),
)
encoded_messages = messages.map(encode_message)


@given(messages)
def test_message_round_trip(message) -> None:
    assert decode_message(encode_message(message)) == message


@given(bad_input(encoded_messages))
@example(Byte(2) + UInt32(1) + UInt32(0xFFFFFFFF)).via("list reply count beyond the data")
@example(Byte(3) + UInt32(1) + String(b"") * 2 + UInt32(0) * 3 + String(b"") * 2 + String(b"\x00")).via(
    "one-byte evidence"
)
def test_decode_message_rejects_narrowly(payload: bytes) -> None:
    message = decoded_or_rejected(decode_message, payload, (ProtocolError,))
    if message is None:
        return

    # Whatever decodes re-encodes to something that decodes to the same message.
    assert decode_message(encode_message(message)) == message
    assert request_id_of(payload) == message.request_id


@given(st.binary(max_size=16) | bad_input(encoded_messages))
def test_request_id_of_any_payload(payload: bytes) -> None:
    request_id = request_id_of(payload)

    if len(payload) < 5:
        assert request_id is None
    else:
        assert request_id == struct.unpack(">I", payload[1:5])[0]


@given(st.none() | evidences)
def test_evidence_round_trip(evidence) -> None:
    encoded = encode_evidence(evidence)
    (length,) = struct.unpack(">I", encoded[:4])

    assert decode_evidence(encoded[4 : 4 + length]) == evidence


@given(bad_input(evidences.map(lambda evidence: encode_evidence(evidence)[4:])))
def test_decode_evidence_rejects_narrowly(blob: bytes) -> None:
    evidence = decoded_or_rejected(decode_evidence, blob, (ProtocolError,))
    if evidence is not None:
        assert decode_evidence(encode_evidence(evidence)[4:]) == evidence


# ---- ssh-agent messages (agent/wire.py) ----------------------------------

agent_sign_requests = st.builds(wire.SignRequest, blobs, st.binary(max_size=256), uint32)
identity_lists = st.lists(st.tuples(blobs, utf8_text()), max_size=4)


@given(agent_sign_requests)
def test_agent_sign_request_round_trip(request: wire.SignRequest) -> None:
    assert wire.decode_sign_request(wire.encode_sign_request(request)[1:]) == request


@given(bad_input(agent_sign_requests.map(lambda request: wire.encode_sign_request(request)[1:])))
def test_agent_sign_request_rejects_narrowly(body: bytes) -> None:
    request = decoded_or_rejected(wire.decode_sign_request, body, (ProtocolError,))
    if request is not None:
        assert wire.encode_sign_request(request)[1:] == body


@given(identity_lists)
def test_identities_answer_round_trip(identities: list[tuple[bytes, str]]) -> None:
    assert wire.decode_identities_answer(wire.encode_identities_answer(identities)[1:]) == identities


@given(bad_input(identity_lists.map(lambda identities: wire.encode_identities_answer(identities)[1:])))
def test_identities_answer_rejects_narrowly(body: bytes) -> None:
    identities = decoded_or_rejected(wire.decode_identities_answer, body, (ProtocolError,))
    if identities is not None:
        assert wire.encode_identities_answer(identities)[1:] == body


@given(bad_input(st.tuples(ssh_strings(), st.binary(max_size=64)).map(lambda pair: String(pair[0]) + pair[1])))
def test_extension_split_is_exact(body: bytes) -> None:
    split = decoded_or_rejected(wire.decode_extension, body, (ProtocolError,))
    if split is not None:
        name, contents = split
        assert String(name) + contents == body


# ---- session-bind@openssh.com (tpmsigner/protocol/sessionbind.py) --------

HOST_KEYS = [
    asyncssh.generate_private_key("ssh-ed25519"),
    asyncssh.generate_private_key("ecdsa-sha2-nistp256"),
    asyncssh.generate_private_key("ecdsa-sha2-nistp384"),
    asyncssh.generate_private_key("ecdsa-sha2-nistp521"),
    asyncssh.generate_private_key("ssh-rsa", key_size=2048),
]


# ECDSA signatures are randomised.  Hypothesis replays a test case by
# drawing the same choices again and needs the same bytes back, so each
# signature is made once and cached.
@functools.lru_cache(maxsize=None)
def _host_signature(key_index: int, algorithm: bytes, session_id: bytes) -> bytes:
    return HOST_KEYS[key_index].sign(session_id, algorithm)


@st.composite
def signed_binds(draw: st.DrawFn) -> SessionBind:
    """Return a session binding with a valid host key signature over its session id."""
    key_index = draw(st.integers(0, len(HOST_KEYS) - 1))
    host_key = HOST_KEYS[key_index]
    algorithm = draw(st.sampled_from([name for name in host_key.sig_algorithms if name in ALLOWED_HOST_KEY_SIGNATURES]))
    session_id = draw(st.binary(min_size=1, max_size=64))
    signature = _host_signature(key_index, algorithm, session_id)
    return SessionBind(host_key.public_data, session_id, signature, draw(st.booleans()))


@given(signed_binds())
def test_signed_binding_verifies_and_round_trips(bind: SessionBind) -> None:
    assert verify_session_bind(bind)
    assert decode_session_bind(encode_session_bind(bind)) == bind


@given(bad_input(signed_binds().map(encode_session_bind), max_random_size=512))
def test_session_bind_rejects_narrowly(contents: bytes) -> None:
    bind = decoded_or_rejected(decode_session_bind, contents, (ProtocolError,))
    if bind is None:
        return

    assert isinstance(verify_session_bind(bind), bool)
    assert bind.host_key_fingerprint.startswith("SHA256:")


@st.composite
def tampered_binds(draw: st.DrawFn) -> SessionBind:
    """Return a signed binding with one of its three byte fields mutated."""
    bind = draw(signed_binds())
    field_name = draw(st.sampled_from(["host_key", "session_id", "signature"]))
    value = draw(mutated(st.just(getattr(bind, field_name))).filter(lambda new: new != getattr(bind, field_name)))
    return SessionBind(**{**bind.__dict__, field_name: value})


@given(tampered_binds())
def test_tampered_binding_does_not_verify(bind: SessionBind) -> None:
    # A changed session id or host key no longer matches the signature, and
    # a changed signature no longer verifies; none of them raises.
    assert verify_session_bind(bind) is False


# ---- signed data (tpmsigner/protocol/signeddata.py) ----------------------

USERAUTH_METHODS = [b"publickey", b"publickey-hostbound-v00@openssh.com"]


@st.composite
def userauth_requests(draw: st.DrawFn) -> tuple[bytes, bytes, dict[str, object]]:
    """Return (data, key blob, expected fields) of an RFC 4252 section 7 userauth request."""
    key_blob = draw(blobs)
    fields = {
        "session_id": draw(st.binary(max_size=64)),
        "user": draw(utf8_text(32)),
        "service": draw(st.text(alphabet=st.characters(codec="ascii"), max_size=16)),
    }
    method = draw(st.sampled_from(USERAUTH_METHODS))
    # RFC 4251 section 6: algorithm names are US-ASCII, and the signer
    # treats a request with any other name as unknown data.
    algorithm = draw(st.text(alphabet=st.characters(codec="ascii"), max_size=24))
    host_key = draw(blobs) if method == USERAUTH_METHODS[1] else None
    data = (
        String(fields["session_id"])
        + Byte(50)
        + String(fields["user"])
        + String(fields["service"])
        + String(method)
        + Boolean(True)
        + String(algorithm)
        + String(key_blob)
        + (String(host_key) if host_key is not None else b"")
    )
    fields["host_key"] = host_key
    return data, key_blob, fields


@st.composite
def sshsig_data(draw: st.DrawFn) -> tuple[bytes, str]:
    """Return (signed data, namespace) of an OpenSSH PROTOCOL.sshsig blob."""
    namespace = draw(utf8_text(32).filter(bool))
    data = (
        b"SSHSIG"
        + String(namespace)
        + String(draw(st.binary(max_size=8)))
        + String(draw(st.sampled_from(["sha256", "sha512"])))
        + String(draw(st.binary(max_size=64)))
    )
    return data, namespace


@given(userauth_requests())
def test_userauth_request_is_login(request: tuple[bytes, bytes, dict[str, object]]) -> None:
    data, key_blob, fields = request

    info = describe_signed_data(data, key_blob)

    assert info.purpose == PURPOSE_SSH_LOGIN
    for name, value in fields.items():
        assert getattr(info, name) == value


@given(sshsig_data())
def test_sshsig_names_its_namespace(signed: tuple[bytes, str]) -> None:
    data, namespace = signed

    info = describe_signed_data(data, b"any key")

    assert info.purpose == SSHSIG_PURPOSE_PREFIX + namespace
    assert info.namespace == namespace


signed_data = st.one_of(
    userauth_requests().map(lambda request: (request[0], request[1])),
    sshsig_data().map(lambda signed: (signed[0], b"key")),
)


@given(
    st.one_of(
        st.tuples(st.binary(max_size=256), blobs),
        st.tuples(mutated(signed_data.map(lambda pair: pair[0])), blobs),
        signed_data.flatmap(lambda pair: st.tuples(mutated(st.just(pair[0])), st.just(pair[1]))),
    )
)
def test_describe_signed_data_never_raises(pair: tuple[bytes, bytes]) -> None:
    data, key_blob = pair

    info = describe_signed_data(data, key_blob)

    assert info.purpose in (PURPOSE_SSH_LOGIN, PURPOSE_UNKNOWN) or info.purpose.startswith(SSHSIG_PURPOSE_PREFIX)
    if info.purpose == PURPOSE_SSH_LOGIN:
        assert info.user is not None and info.session_id is not None
        assert info.destination == f"{info.user}@?"


# ---- SSH key blobs and signatures (tpmsigner/protocol/sshkeys.py) --------

ECDSA_PRIVATE_KEYS = [ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP384R1())]
RSA_PRIVATE_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _ecdsa_public(private_key: ec.EllipticCurvePrivateKey) -> EcdsaPublicKey:
    numbers = private_key.public_key().public_numbers()
    curve = NISTP256 if isinstance(private_key.curve, ec.SECP256R1) else NISTP384
    return EcdsaPublicKey(curve, numbers.x, numbers.y)


RSA_PUBLIC = RsaPublicKey(RSA_PRIVATE_KEY.public_key().public_numbers().n, 65537)
PUBLIC_KEYS = [*map(_ecdsa_public, ECDSA_PRIVATE_KEYS), RSA_PUBLIC]


@functools.lru_cache(maxsize=None)
def _signature(key_index: int, rsa_scheme: str, data: bytes) -> bytes:
    """Return an SSH signature blob, made once per input (see _host_signature)."""
    key = PUBLIC_KEYS[key_index]
    if isinstance(key, EcdsaPublicKey):
        hash_class = hashes.SHA256 if key.curve is NISTP256 else hashes.SHA384
        r, s = decode_dss_signature(ECDSA_PRIVATE_KEYS[key_index].sign(data, ec.ECDSA(hash_class())))
        return encode_ecdsa_signature(key, r, s)
    scheme = RSA_SHA2_256 if rsa_scheme == RSA_SHA2_256.algorithm else RSA_SHA2_512
    hash_class = hashes.SHA256 if scheme is RSA_SHA2_256 else hashes.SHA512
    return encode_rsa_signature(key, scheme, RSA_PRIVATE_KEY.sign(data, padding.PKCS1v15(), hash_class()))


@st.composite
def signatures(draw: st.DrawFn) -> tuple[EcdsaPublicKey | RsaPublicKey, bytes, bytes]:
    """Return (public key, data, valid SSH signature blob over data)."""
    data = draw(st.binary(max_size=128))
    key_index = draw(st.integers(0, len(PUBLIC_KEYS) - 1))
    rsa_scheme = draw(st.sampled_from([RSA_SHA2_256.algorithm, RSA_SHA2_512.algorithm]))
    return PUBLIC_KEYS[key_index], data, _signature(key_index, rsa_scheme, data)


@given(signatures())
def test_valid_signature_verifies(signed) -> None:
    key, data, signature = signed
    assert verify_signature(key, data, signature) is True


@given(signatures().flatmap(lambda signed: st.tuples(st.just(signed), mutated(st.just(signed[2])))))
def test_mutated_signature_is_rejected_without_error(pair) -> None:
    (key, data, signature), tampered = pair
    if tampered == signature:
        return
    assert verify_signature(key, data, tampered) is False


@given(st.sampled_from(PUBLIC_KEYS), st.binary(max_size=32), st.binary(max_size=600))
def test_random_signature_is_rejected_without_error(key, data: bytes, signature: bytes) -> None:
    assert verify_signature(key, data, signature) is False


rsa_blobs_with_numbers = st.builds(
    lambda e, n: String("ssh-rsa") + MPInt(e) + MPInt(n),
    st.integers(0, 2**20),
    st.one_of(st.integers(0, 2**1100), st.just(RSA_PUBLIC.n), st.integers(2**1023, 2**2048)),
)
key_blobs = st.one_of(st.sampled_from([key.blob for key in PUBLIC_KEYS]), rsa_blobs_with_numbers)


@given(bad_input(key_blobs, max_random_size=300))
@example(String("ssh-rsa") + MPInt(65537) + MPInt(2**2047)).via("even modulus")
@example(String("ssh-rsa") + MPInt(2**2048 + 1) + MPInt(2**2047 + 1)).via("exponent above the modulus")
def test_public_key_blob_bad_input(blob: bytes) -> None:
    key = decoded_or_rejected(public_key_from_blob, blob, (ProtocolError,))
    if key is None:
        return

    # A key the parser accepts must be usable: it re-encodes, and it can
    # check a signature (here a wrong one) without raising.
    assert public_key_from_blob(key.blob) == key
    assert key.fingerprint.startswith("SHA256:")
    assert key.openssh_line("comment").startswith(key.key_type + " ")
    assert verify_signature(key, b"data", String(key.key_type) + String(b"\x00" * 8)) is False


# ---- pairing messages (tpmsigner/pairing.py) ------------------------------

pairing_messages = st.one_of(
    st.builds(pairing.Hello, utf8_text(64)),
    st.builds(pairing.Confirm, st.booleans(), utf8_text(200)),
    st.builds(pairing.Result, st.booleans(), utf8_text(200)),
)


@given(pairing_messages)
def test_pairing_message_round_trip(message) -> None:
    assert pairing.decode(pairing.encode(message)) == message


@given(bad_input(pairing_messages.map(pairing.encode)))
@example(Byte(1) + String(b"n" * 256)).via("name over the limit")
def test_pairing_message_rejects_narrowly(payload: bytes) -> None:
    message = decoded_or_rejected(pairing.decode, payload, (ProtocolError,))
    if message is not None:
        assert pairing.encode(message) == payload


# ---- mDNS TXT records (tpmsigner/discovery.py) ----------------------------


@given(st.dictionaries(st.binary(max_size=8) | st.sampled_from([b"fp", b"v"]), st.none() | st.binary(max_size=64)))
def test_txt_record_fields_are_text_or_none(properties: dict[bytes, bytes | None]) -> None:
    record = parse_txt(properties)

    assert isinstance(record, TxtRecord)
    for key, value in ((b"fp", record.fingerprint), (b"v", record.version)):
        raw = properties.get(key)
        if value is not None:
            assert value.encode("utf-8") == raw
        else:
            assert raw is None or not _is_utf8(raw)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
