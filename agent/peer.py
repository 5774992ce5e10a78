"""The process on the other end of the agent socket (SO_PEERCRED, then /proc)."""

from __future__ import annotations

import os
import shlex
import socket
import struct
from dataclasses import dataclass

from tpmsigner.protocol.messages import UNKNOWN_ID, ProcessInfo

MAX_COMMAND_LINE = 1024


@dataclass(frozen=True)
class PeerCredentials:
    """The kernel's record of the connecting process, taken at connect time."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials | None:
    """Return SO_PEERCRED of a connected UNIX socket, or None where unsupported."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid)


def process_arguments(credentials: PeerCredentials | None) -> list[str]:
    """Return the peer's argv from /proc, or an empty list when it cannot be read."""
    if credentials is None:
        return []
    try:
        with open(f"/proc/{credentials.pid}/cmdline", "rb") as cmdline_file:
            raw = cmdline_file.read(64 * 1024)
    except OSError:
        return []
    return [part.decode("utf-8", errors="replace") for part in raw.split(b"\0") if part]


def process_info(credentials: PeerCredentials | None) -> ProcessInfo:
    """Describe the peer process for the signer's prompt.

    /proc is read when a request arrives.  The pid may have been reused by
    then, which is why the uid comes from SO_PEERCRED and not from /proc.
    """
    if credentials is None:
        return ProcessInfo()

    try:
        executable = os.readlink(f"/proc/{credentials.pid}/exe")
    except OSError:
        executable = ""
    command_line = shlex.join(process_arguments(credentials))
    if len(command_line) > MAX_COMMAND_LINE:
        command_line = command_line[: MAX_COMMAND_LINE - 3] + "..."

    return ProcessInfo(
        pid=credentials.pid if credentials.pid > 0 else UNKNOWN_ID,
        uid=credentials.uid if credentials.uid >= 0 else UNKNOWN_ID,
        executable=executable,
        command_line=command_line,
    )
