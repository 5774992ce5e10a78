"""Benchmarks of tpmsigner side by side with OpenSSH's agent and tpm2-pkcs11.

Run everything with ``bench/run`` (see docs/benchmarks.md); the modules here
are the parts of that one run.
"""
