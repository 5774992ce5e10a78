"""tpmsigner-agent: an ssh-agent that forwards every signature to a signer.

Installed as the ``tpmsigner_agent`` package.  It holds no private key: it
lists the signers' public keys and relays sign requests over Noise.
"""
