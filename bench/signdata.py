"""What the benchmark asks the agents to sign."""

from __future__ import annotations

import hashlib
import struct

NAMESPACE = b"file"


def _string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def sshsig_data(message: str) -> bytes:
    """Return the SSHSIG signed data of ``message`` (PROTOCOL.sshsig), as `ssh-keygen -Y sign -n file` builds it."""
    digest = hashlib.sha512(message.encode("utf-8")).digest()
    return b"SSHSIG" + _string(NAMESPACE) + _string(b"") + _string(b"sha512") + _string(digest)
