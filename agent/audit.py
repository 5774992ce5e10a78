"""The agent's audit log: one hash-chained JSON line per sign request.

The log lives in ``$XDG_STATE_HOME/tpmsigner-agent/audit.jsonl`` (mode
0600) unless ``run --audit-log`` names another file.  ``tpmsigner-agent
audit`` prints it and ``audit verify`` checks the chain; the format is that
of ``tpmsigner.audit``.  A request forwarded to an upstream agent (``run
--upstream``) has an ``upstream`` field with that agent's socket path, and
the outcome ``signed`` when the upstream agent signed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tpmsigner.protocol.messages import UNKNOWN_ID, ProcessInfo
from tpmsigner.protocol.sessionbind import BindingEvidence
from tpmsigner.protocol.signeddata import SignedDataInfo


def default_audit_path() -> Path:
    state_home = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state_home) / "tpmsigner-agent" / "audit.jsonl"


class AuditEntry:
    """The facts the agent collects about one sign request, for its audit record."""

    def __init__(
        self, request_id: int, started: float, process: ProcessInfo, fingerprint: str, info: SignedDataInfo
    ) -> None:
        self.request_id = request_id
        self.started = started
        self.process = process
        self.fingerprint = fingerprint
        self.info = info
        self.evidence: BindingEvidence | None = None
        self.signer = ""
        # The upstream agent's socket, for a request forwarded there.
        self.upstream = ""

    def to_record(self, outcome: str, reason: str) -> dict[str, object]:
        evidence = self.evidence
        record: dict[str, object] = {
            "request_id": self.request_id,
            "pid": None if self.process.pid == UNKNOWN_ID else self.process.pid,
            "uid": None if self.process.uid == UNKNOWN_ID else self.process.uid,
            "executable": self.process.executable,
            "command_line": self.process.command_line,
            "key_fingerprint": self.fingerprint,
            "purpose": self.info.purpose,
            "destination": {
                "user": self.info.user,
                "host": evidence.host_name if evidence else None,
                "host_key_fingerprint": evidence.bind.host_key_fingerprint if evidence else None,
                "verified": bool(evidence and evidence.name_verified and evidence.host_name),
                "forwarded": bool(evidence and evidence.forwarded),
            },
            "signer": self.signer,
            "outcome": outcome,
            "reason": reason,
            "latency_ms": round((time.monotonic() - self.started) * 1000),
        }
        if self.upstream:
            record["upstream"] = self.upstream
        return record
