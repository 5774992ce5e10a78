"""tpmsigner: SSH keys that live in a TPM 2.0 and sign only with a PIN.

The library creates TPM keys and signs with them directly::

    import tpmsigner

    with tpmsigner.Tpm("swtpm:host=127.0.0.1,port=2321") as tpm:
        store = tpmsigner.KeyStore(Path("~/.local/share/tpmsigner").expanduser())
        identity = tpmsigner.create_identity(tpm, store, "work", pin=b"1234")
        signature = tpmsigner.sign_data(tpm, store, identity, b"data", pin=b"1234")

``signature`` is an SSH signature blob (RFC 5656 section 3.1.2) that
verifies with ``identity.openssh_line()``.

The names are loaded on first use, so that the agent, which imports only
``tpmsigner.protocol``, does not load the TPM libraries.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "Tpm": "tpmsigner.tpm",
    "TpmKeyBlob": "tpmsigner.tpm",
    "KeyStore": "tpmsigner.store",
    "Identity": "tpmsigner.store",
    "TpmBinding": "tpmsigner.store",
    "KeyType": "tpmsigner.keytypes",
    "KEY_TYPES": "tpmsigner.keytypes",
    "TpmEllipticCurvePrivateKey": "tpmsigner.pyca_keys",
    "TpmRsaPrivateKey": "tpmsigner.pyca_keys",
    "private_key_for": "tpmsigner.pyca_keys",
    "TpmSSHKeyPair": "tpmsigner.asyncssh_keys",
    "create_identity": "tpmsigner.identities",
    "sign_data": "tpmsigner.identities",
    "ApprovalRequest": "tpmsigner.signer.approvers",
    "CallableApprover": "tpmsigner.signer.approvers",
    "TpmSignerError": "tpmsigner.errors",
    "TpmError": "tpmsigner.errors",
    "TpmAuthError": "tpmsigner.errors",
    "TpmLockoutError": "tpmsigner.errors",
    "TpmKeyLoadError": "tpmsigner.errors",
    "TpmBindingError": "tpmsigner.errors",
    "TpmUnavailableError": "tpmsigner.errors",
    "KeyStoreError": "tpmsigner.errors",
    "StateWriteError": "tpmsigner.errors",
    "IdentityNotFoundError": "tpmsigner.errors",
    "IdentityExistsError": "tpmsigner.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from .errors import (
        IdentityExistsError,
        IdentityNotFoundError,
        KeyStoreError,
        StateWriteError,
        TpmAuthError,
        TpmBindingError,
        TpmError,
        TpmKeyLoadError,
        TpmLockoutError,
        TpmSignerError,
        TpmUnavailableError,
    )
    from .asyncssh_keys import TpmSSHKeyPair
    from .identities import create_identity, sign_data
    from .keytypes import KEY_TYPES, KeyType
    from .pyca_keys import TpmEllipticCurvePrivateKey, TpmRsaPrivateKey, private_key_for
    from .signer.approvers import ApprovalRequest, CallableApprover
    from .store import Identity, KeyStore, TpmBinding
    from .tpm import Tpm, TpmKeyBlob


def __getattr__(name: str) -> object:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'tpmsigner' has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)
