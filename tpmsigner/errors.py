"""Exception hierarchy shared by the library, the signer host and the agent.

Every exception derives from TpmSignerError, so a caller can catch all of
them at once, and each subclass names one thing that went wrong.  Messages
never contain a PIN.
"""

from __future__ import annotations


class TpmSignerError(Exception):
    """Base class of every error raised by tpmsigner."""


class ConfigError(TpmSignerError):
    """A setting, file or command-line value is invalid or missing."""


class KeyStoreError(TpmSignerError):
    """The key store cannot read or write an identity."""


class StateWriteError(TpmSignerError, OSError):
    """A state file could not be written (a full disk, say); the previous version is unchanged.

    It is also an OSError, so code that handles failed writes as OSError keeps working.
    """


class IdentityNotFoundError(KeyStoreError):
    """No identity with the requested label or public key exists."""


class IdentityExistsError(KeyStoreError):
    """An identity with the requested label already exists."""


class KeyFileError(KeyStoreError):
    """A TSS2 PRIVATE KEY file or its metadata is malformed."""


class TpmError(TpmSignerError):
    """The TPM returned an error or could not be reached.

    ``rc`` is the TSS2 response code when the TPM or the TSS produced one.
    """

    def __init__(self, message: str, rc: int | None = None) -> None:
        super().__init__(message)
        self.rc = rc


class TpmUnavailableError(TpmError):
    """The TPM cannot be reached through the configured TCTI."""


class TpmAuthError(TpmError):
    """The TPM rejected the PIN (TPM_RC_AUTH_FAIL); counts toward lockout."""


class TpmLockoutError(TpmError):
    """The TPM is in dictionary-attack lockout (TPM_RC_LOCKOUT)."""


class UnsupportedByTpmError(TpmError):
    """The TPM does not implement the requested key type or hash."""


class TpmKeyLoadError(TpmError):
    """A key blob does not load on this TPM: another TPM, or a cleared one."""


class TpmBindingError(TpmError):
    """The TPM's storage key is not the one recorded when the keys were made."""


class ProtocolError(TpmSignerError):
    """A peer sent a message that does not follow the wire format."""


class CertificateError(ProtocolError):
    """An OpenSSH certificate is malformed, of an unsupported kind, or not for the identity."""


class ChannelError(TpmSignerError):
    """The encrypted channel between agent and signer failed."""


class ChannelClosedError(ChannelError):
    """The peer closed the connection between two messages, as it does on a normal stop."""


class PeerNotTrustedError(ChannelError):
    """The peer's Noise static key is not in the list of trusted keys."""


class PinentryError(TpmSignerError):
    """A pinentry program broke the Assuan protocol, failed to start or exited early."""


class SignerError(TpmSignerError):
    """The signer rejected or could not complete a request."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code
