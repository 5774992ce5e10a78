"""TPM keys as asyncssh client keys, for logins without any agent.

``asyncssh.connect(host, client_keys=[TpmSSHKeyPair(...)])`` logs in with a
key that stays in the TPM.  Each signature calls ``pin_callback`` for the PIN
and runs in a worker thread, so the event loop keeps running while the TPM
works.
"""

from __future__ import annotations

import asyncio

from asyncssh import SSHKeyPair

from .identities import sign_data
from .protocol.sshkeys import RSA_KEY_TYPE, SSH_AGENT_RSA_SHA2_256, SSH_AGENT_RSA_SHA2_512
from .pyca_keys import PinCallback, _pin_bytes
from .store import Identity, KeyStore
from .tpm import Tpm

# The RSA signature algorithms asyncssh may choose, best first (RFC 8332).
_RSA_SIGNATURE_ALGORITHMS = (b"rsa-sha2-256", b"rsa-sha2-512", b"ssh-rsa")


class TpmSSHKeyPair(SSHKeyPair):
    """An asyncssh key pair whose private half is a TPM key."""

    _key_type = "tpm"

    def __init__(self, tpm: Tpm, store: KeyStore, identity: Identity, pin_callback: PinCallback) -> None:
        algorithm = identity.public_key.key_type.encode("ascii")
        if algorithm == RSA_KEY_TYPE.encode():
            signature_algorithms: tuple[bytes, ...] = _RSA_SIGNATURE_ALGORITHMS
        else:
            signature_algorithms = (algorithm,)
        super().__init__(
            algorithm,
            algorithm,
            signature_algorithms,
            signature_algorithms,
            identity.public_key_blob,
            identity.label,
        )
        self._tpm = tpm
        self._store = store
        self._identity = identity
        self._pin_callback = pin_callback
        self._flags = 0

    def set_sig_algorithm(self, sig_algorithm: bytes) -> None:
        """Record the algorithm asyncssh negotiated, as ssh-agent flags."""
        super().set_sig_algorithm(sig_algorithm)
        if sig_algorithm == b"rsa-sha2-256":
            self._flags = SSH_AGENT_RSA_SHA2_256
        elif sig_algorithm == b"rsa-sha2-512":
            self._flags = SSH_AGENT_RSA_SHA2_512
        else:
            self._flags = 0

    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` in the TPM and return an SSH signature blob."""
        pin = _pin_bytes(self._pin_callback)
        return sign_data(self._tpm, self._store, self._identity, data, pin, self._flags)

    async def sign_async(self, data: bytes) -> bytes:
        return await asyncio.to_thread(self.sign, data)
