"""Recognise what an SSH agent is asked to sign.

Both the agent (for its log) and the signer (for the approval prompt) call
``describe_signed_data``.  The signer never takes the agent's word for the
purpose: it parses the same bytes itself.

Two forms are recognised:

- a user authentication request, RFC 4252 section 7, in the ``publickey``
  form and in OpenSSH's ``publickey-hostbound-v00@openssh.com`` form
  (OpenSSH PROTOCOL, section 2.5), which appends the server's host key.
  With a certificate (PROTOCOL.certkeys) its public key is the certificate
  blob and its algorithm a certificate algorithm, such as
  ``rsa-sha2-512-cert-v01@openssh.com``;
- an SSHSIG signed-data blob, OpenSSH PROTOCOL.sshsig, made by
  ``ssh-keygen -Y sign``.

Anything else is reported as ``unknown``.  It may still be signed if the
person approves, because the agent protocol allows arbitrary data.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sshwire import PacketDecodeError, SshReader

from .sshkeys import certified_key_blob

SSH_MSG_USERAUTH_REQUEST = 50          # RFC 4250 section 4.1.2
USERAUTH_METHOD_PUBLICKEY = b"publickey"
USERAUTH_METHOD_HOSTBOUND = b"publickey-hostbound-v00@openssh.com"
SSHSIG_MAGIC = b"SSHSIG"               # PROTOCOL.sshsig: six bytes, not a string

PURPOSE_SSH_LOGIN = "ssh-login"
PURPOSE_UNKNOWN = "unknown"
SSHSIG_PURPOSE_PREFIX = "sshsig:"


@dataclass(frozen=True)
class SignedDataInfo:
    """What the data to be signed is for, as far as its bytes show."""

    purpose: str                      # "ssh-login", "sshsig:NAMESPACE" or "unknown"
    user: str | None = None           # login user name of a userauth request
    service: str | None = None        # "ssh-connection" for a login
    session_id: bytes | None = None   # exchange hash H of the SSH session
    host_key: bytes | None = None     # server host key blob, hostbound form only
    algorithm: str | None = None      # public key algorithm of a userauth request
    certificate: bytes | None = None  # certificate blob that a userauth request offers
    namespace: str | None = None      # SSHSIG namespace
    hash_algorithm: str | None = None  # SSHSIG message hash, "sha256" or "sha512"

    @property
    def destination(self) -> str:
        """``user@?`` for a login (the host is not proven here), else empty."""
        if self.purpose == PURPOSE_SSH_LOGIN and self.user is not None:
            return f"{self.user}@?"
        return ""


def describe_signed_data(data: bytes, key_blob: bytes) -> SignedDataInfo:
    """Classify ``data`` that an agent client asked to sign with ``key_blob``.

    A userauth request only counts as a login when it names the key that
    will sign it, or a certificate of that key, because nothing else can
    come from an honest ssh client.
    """
    login = _parse_userauth_request(data, key_blob)
    if login is not None:
        return login

    sshsig = _parse_sshsig(data)
    if sshsig is not None:
        return sshsig

    return SignedDataInfo(purpose=PURPOSE_UNKNOWN)


def _parse_userauth_request(data: bytes, key_blob: bytes) -> SignedDataInfo | None:
    # RFC 4252 section 7: the signature covers
    #   string session identifier, byte SSH_MSG_USERAUTH_REQUEST,
    #   string user name, string service name, string "publickey",
    #   boolean TRUE, string algorithm name, string public key blob
    # and the hostbound form appends: string server host key.
    try:
        packet = SshReader(data)
        session_id = packet.get_string()
        if packet.get_byte() != SSH_MSG_USERAUTH_REQUEST:
            return None
        user = packet.get_string().decode("utf-8")
        service = packet.get_string().decode("ascii")
        method = packet.get_string()
        if method not in (USERAUTH_METHOD_PUBLICKEY, USERAUTH_METHOD_HOSTBOUND):
            return None
        if not packet.get_boolean():
            return None
        algorithm = packet.get_string().decode("ascii")
        request_key_blob = packet.get_string()
        host_key = packet.get_string() if method == USERAUTH_METHOD_HOSTBOUND else None
        packet.check_end()
    except (PacketDecodeError, UnicodeDecodeError):
        return None

    # When an agent lists a key and its certificate, OpenSSH's ssh (9.2,
    # sign_and_send_pubkey) offers the certificate but requests the
    # signature with the plain key.  Other clients name the certificate.
    certified = certified_key_blob(request_key_blob)
    if key_blob not in (request_key_blob, certified):
        return None

    return SignedDataInfo(
        purpose=PURPOSE_SSH_LOGIN,
        user=user,
        service=service,
        session_id=session_id,
        host_key=host_key,
        algorithm=algorithm,
        certificate=request_key_blob if certified is not None else None,
    )


def _parse_sshsig(data: bytes) -> SignedDataInfo | None:
    # PROTOCOL.sshsig "Signed Data": MAGIC_PREAMBLE, string namespace,
    # string reserved, string hash_algorithm, string H(message).
    if not data.startswith(SSHSIG_MAGIC):
        return None
    try:
        packet = SshReader(data[len(SSHSIG_MAGIC) :])
        namespace = packet.get_string().decode("utf-8")
        packet.get_string()                 # reserved
        hash_algorithm = packet.get_string().decode("ascii")
        packet.get_string()                 # H(message)
        packet.check_end()
    except (PacketDecodeError, UnicodeDecodeError):
        return None

    if not namespace:
        return None
    return SignedDataInfo(
        purpose=SSHSIG_PURPOSE_PREFIX + namespace,
        namespace=namespace,
        hash_algorithm=hash_algorithm,
    )
