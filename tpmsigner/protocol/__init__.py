"""Wire formats shared by the signer host and the agent.

Nothing in this package touches a TPM or a socket option: the signer and
the agent both import it, and neither imports the other.
"""
