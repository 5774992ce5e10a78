"""The text of a sign request as desktop prompts and notifications show it.

Every field that a peer controls (device name, process, purpose,
destination) has its control characters escaped and its length capped.  So
a long command line cannot push the destination out of a dialog, and no
field can start a new line, repaint a terminal or, in a pinentry, start a
new Assuan command.
"""

from __future__ import annotations

from .approvers import ApprovalRequest, _printable

ELLIPSIS = "\u2026"

# Maximum characters shown per field.  The whole description must fit in one
# 1000-byte Assuan line (see assuan.py) with room to spare.
MAX_NAME_CHARS = 64
MAX_PURPOSE_CHARS = 128
MAX_DESTINATION_CHARS = 200
MAX_PROCESS_CHARS = 240


def shorten(text: str, max_chars: int, *, keep_end: bool = False) -> str:
    """Escape control characters in ``text`` and cut it to ``max_chars``, marking a cut with an ellipsis.

    With ``keep_end``, the middle is cut instead of the end and the last two
    thirds are kept: a command line names its destination last.
    """
    shown = _printable(text)
    if len(shown) <= max_chars:
        return shown
    if not keep_end:
        return shown[: max_chars - 1] + ELLIPSIS
    head = max_chars // 3
    tail = max_chars - head - 1
    return shown[:head] + ELLIPSIS + shown[-tail:]


def destination_line(request: ApprovalRequest) -> str:
    """Return ``user@host (verified)``, ``user@host (NOT verified)``, or "" without a destination."""
    if not request.destination:
        return ""
    state = "verified" if request.destination_verified else "NOT verified"
    return f"{shorten(request.destination, MAX_DESTINATION_CHARS)} ({state})"


def describe_request(request: ApprovalRequest) -> str:
    """Return the request's details as lines, most important first.

    The first line is fixed text: pinentry-qt decides whether a label is
    rich text by looking for a tag before the first line break, and this
    keeps untrusted text out of that line.  The process comes last because
    it is the longest field and the one the signer cannot check.
    """
    lines = [
        f"Signature request #{request.request_id}",
        f"device: {shorten(request.device, MAX_NAME_CHARS)}",
        f"key: {shorten(request.key_label, MAX_NAME_CHARS)} ({request.key_fingerprint})",
        f"purpose: {shorten(request.purpose, MAX_PURPOSE_CHARS)}",
    ]
    if request.destination:
        lines.append(f"destination: {destination_line(request)}")
    if request.host_key_fingerprint:
        lines.append(f"host key: {request.host_key_fingerprint}")
    if request.forwarded:
        lines.append("forwarded: yes, through a forwarded agent on another host")
    lines.append(f"process: {shorten(request.process.describe(), MAX_PROCESS_CHARS, keep_end=True)}")
    return "\n".join(lines)
