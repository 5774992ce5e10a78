"""The signer host: the Noise server in front of the TPM, and its approvers."""
