"""The signer's own check of where a login goes.

The agent sends the session binding that ssh gave it.  The signer checks
the host key's signature over the session identifier itself and that the
userauth request to be signed is for that same session, so an agent cannot
claim a host key that did not sign the session.  The host name comes from
the agent's known_hosts lookup, which the signer cannot check, and is
marked verified only when the agent found the bound key listed for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..protocol.sessionbind import BindingEvidence, verify_session_bind
from ..protocol.signeddata import PURPOSE_SSH_LOGIN, SignedDataInfo


class DestinationError(Exception):
    """The binding evidence does not fit the request: a broken or lying agent."""


@dataclass(frozen=True)
class Destination:
    """A login's destination, as the approver is shown it."""

    text: str                       # "user@host", "user@?" or ""
    verified: bool = False
    host_key_fingerprint: str = ""
    forwarded: bool = False
    host_key: bytes | None = None   # the bound host key, for destination restrictions


def check_destination(info: SignedDataInfo, evidence: BindingEvidence | None) -> Destination:
    """Return the destination of a request; raise DestinationError for evidence that does not hold."""
    if evidence is None:
        # Even the hostbound userauth form, which names a host key, proves
        # nothing without a binding, so no host key is reported.
        return Destination(text=info.destination)

    if info.purpose != PURPOSE_SSH_LOGIN:
        raise DestinationError("the agent sent a session binding with a request that is not a login")
    bind = evidence.bind
    if not verify_session_bind(bind):
        raise DestinationError("the session binding's host key signature does not verify")
    if bind.session_id != info.session_id:
        raise DestinationError("the session binding is for another session than the userauth request")
    if info.host_key is not None and info.host_key != bind.host_key:
        raise DestinationError("the userauth request names another host key than the session binding")

    host = evidence.host_name or "?"
    return Destination(
        text=f"{info.user}@{host}",
        verified=evidence.name_verified and bool(evidence.host_name),
        host_key_fingerprint=bind.host_key_fingerprint,
        forwarded=evidence.forwarded,
        host_key=bind.host_key,
    )
