"""A signer built from the library with an in-process approver, run as its own program.

Usage: python tests/support/embedded_signer.py --home HOME --listen HOST:PORT --pin-file FILE

It builds ``SignerServer`` the way ``tpmsigner serve`` does (same key store,
Noise key, devices.json and audit log under HOME), but approves every
request with a ``CallableApprover`` that returns the PIN read from FILE.  No
approver program starts per request, so the chain can be driven with
thousands of signatures.  The TPM is the one TPMSIGNER_TCTI names.  It runs
as a process of its own, so a test can measure its memory in
/proc/PID/status and stop it with SIGTERM like the real daemon.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tpmsigner.audit import AuditLog
from tpmsigner.cliutil import serve_until_signal
from tpmsigner.commands.signer import AUDIT_FILE, DEVICES_FILE, NOISE_KEY_FILE, parse_listen
from tpmsigner.fsutil import read_secret_line
from tpmsigner.logsetup import configure_logging
from tpmsigner.protocol.channel import StaticKey
from tpmsigner.signer.approvers import ApprovalRequest, CallableApprover
from tpmsigner.signer.devices import DeviceRegistry
from tpmsigner.signer.server import SignerConfig, SignerServer
from tpmsigner.signer.worker import TpmWorker
from tpmsigner.store import KeyStore, TpmBinding
from tpmsigner.tpm import Tpm

APPROVAL_TIMEOUT = 30.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True, help="signer home, as for 'tpmsigner --home'")
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    parser.add_argument("--pin-file", required=True, help="file whose first line is the PIN to approve with")
    args = parser.parse_args(argv)
    # The same log lines as serve's, so tests read both the same way.
    configure_logging(logging.INFO)

    home = Path(args.home)
    host, port = parse_listen(args.listen)
    pin = read_secret_line(Path(args.pin_file))

    async def approve(request: ApprovalRequest) -> str:
        return pin

    tpm = Tpm(os.environ["TPMSIGNER_TCTI"], flush_stale_handles=True, parent_check=TpmBinding(home).check)
    worker = TpmWorker(tpm)
    server = SignerServer(
        store=KeyStore(home),
        worker=worker,
        static_key=StaticKey.load_or_create(home / NOISE_KEY_FILE),
        devices=DeviceRegistry(home / DEVICES_FILE),
        approver=CallableApprover(approve),
        config=SignerConfig(host=host, port=port, approval_timeout=APPROVAL_TIMEOUT),
        audit_log=AuditLog(home / AUDIT_FILE),
    )
    try:
        serve_until_signal(server.start, server.close)
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
