"""tpmsigner: SSH keys that live in a TPM 2.0 and sign only with a PIN.

The library part lets a Python program create TPM keys and sign with them
directly; see ``tpmsigner.api``.
"""

__version__ = "0.1.0"
