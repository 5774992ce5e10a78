"""OpenSSH's session-bind@openssh.com agent extension and the evidence built on it.

OpenSSH PROTOCOL.agent, section "session-bind@openssh.com": before it uses
the agent, ssh sends

    byte    SSH_AGENTC_EXTENSION
    string  "session-bind@openssh.com"
    string  hostkey
    string  session identifier
    string  signature
    bool    is_forwarding

where the signature is the server host key's signature over the session
identifier (the exchange hash H of RFC 4253 section 8), taken from the key
exchange.  It proves which host key the session is with.  A later userauth
request to be signed carries the same session identifier, so the agent, and
the signer after it, can tell which host a login is for.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sshwire import Boolean, PacketDecodeError, SshReader, String

from ..errors import ProtocolError
from .sshkeys import fingerprint_of_blob

SESSION_BIND_EXTENSION = b"session-bind@openssh.com"

# Host key signature algorithms accepted for a binding: those OpenSSH 9.2
# servers sign with.  ssh-rsa (SHA-1) and DSA are not accepted.
ALLOWED_HOST_KEY_SIGNATURES = {
    b"ssh-ed25519",
    b"ecdsa-sha2-nistp256",
    b"ecdsa-sha2-nistp384",
    b"ecdsa-sha2-nistp521",
    b"rsa-sha2-256",
    b"rsa-sha2-512",
}


@dataclass(frozen=True)
class SessionBind:
    """One session-bind@openssh.com message."""

    host_key: bytes
    session_id: bytes
    signature: bytes
    is_forwarding: bool

    @property
    def host_key_fingerprint(self) -> str:
        return fingerprint_of_blob(self.host_key)


def decode_session_bind(contents: bytes) -> SessionBind:
    """Parse the extension contents after the name; raise ProtocolError if malformed."""
    try:
        packet = SshReader(contents)
        bind = SessionBind(packet.get_string(), packet.get_string(), packet.get_string(), packet.get_boolean())
        packet.check_end()
    except PacketDecodeError as exc:
        raise ProtocolError(f"malformed session-bind request: {exc}") from None
    return bind


def encode_session_bind(bind: SessionBind) -> bytes:
    return String(bind.host_key) + String(bind.session_id) + String(bind.signature) + Boolean(bind.is_forwarding)


def verify_session_bind(bind: SessionBind) -> bool:
    """Return True if the host key signed the session identifier."""
    try:
        algorithm = SshReader(bind.signature).get_string()
    except PacketDecodeError:
        return False
    if algorithm not in ALLOWED_HOST_KEY_SIGNATURES:
        return False
    # asyncssh knows every host key type OpenSSH signs with; it is imported
    # here, not at start, because importing it takes longer than the agent
    # may take to start (the agent imports it in the background once it
    # listens: tpmsigner_agent.run).
    import asyncssh
    from asyncssh.public_key import decode_ssh_public_key

    try:
        host_key = decode_ssh_public_key(bind.host_key)
        return bool(host_key.verify(bind.session_id, bind.signature))
    # asyncssh 2.24 lets cryptography's OverflowError through for an RSA
    # key whose modulus is a negative mpint.
    except (asyncssh.KeyImportError, ValueError, OverflowError):
        return False


@dataclass(frozen=True)
class BindingEvidence:
    """The agent's report to the signer about a login's destination.

    ``bind`` is the binding that the userauth request's session identifier
    matched; the signer checks its signature itself.  ``host_name`` and
    ``name_verified`` are the agent's findings from the user's known_hosts,
    which the signer cannot check.
    """

    bind: SessionBind
    forwarded: bool        # the request arrived over a forwarded agent connection
    host_name: str         # "" when no known_hosts name matched
    name_verified: bool    # the bound host key is the known_hosts key for host_name


def encode_evidence(evidence: BindingEvidence | None) -> bytes:
    """Encode evidence as one SSH string; an empty string means none."""
    if evidence is None:
        return String(b"")
    body = (
        encode_session_bind(evidence.bind)
        + Boolean(evidence.forwarded)
        + String(evidence.host_name)
        + Boolean(evidence.name_verified)
    )
    return String(body)


def decode_evidence(blob: bytes) -> BindingEvidence | None:
    if not blob:
        return None
    try:
        packet = SshReader(blob)
        bind = SessionBind(packet.get_string(), packet.get_string(), packet.get_string(), packet.get_boolean())
        evidence = BindingEvidence(
            bind=bind,
            forwarded=packet.get_boolean(),
            host_name=packet.get_string().decode("utf-8"),
            name_verified=packet.get_boolean(),
        )
        packet.check_end()
    except (PacketDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed binding evidence: {exc}") from None
    return evidence
