"""Pid files, and stopping a running agent for ``run -k``."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path

from tpmsigner.errors import ConfigError
from tpmsigner.fsutil import write_private_file

# How long ``run -k`` waits for the agent to exit after SIGTERM; the agent
# itself waits up to 5 s for its connections to close.
KILL_TIMEOUT = 10.0
_POLL_INTERVAL = 0.05
MAX_PID_FILE_SIZE = 64


def write_pid_file(path: Path, pid: int) -> None:
    """Write ``pid`` and a newline to ``path`` atomically, mode 0600."""
    write_private_file(Path(path), f"{pid}\n".encode())


def remove_pid_file(path: Path, pid: int) -> None:
    """Remove the pid file if it still names ``pid``, so a newer agent's file stays."""
    try:
        if read_pid_file(path) == pid:
            Path(path).unlink()
    except (ConfigError, OSError):
        pass


def read_pid_file(path: Path) -> int:
    """Return the pid in a pid file that this user owns."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"cannot read the pid file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as pid_file:
        owner = os.fstat(pid_file.fileno()).st_uid
        text = pid_file.read(MAX_PID_FILE_SIZE).decode("ascii", errors="replace").strip()
    if owner != os.getuid():
        raise ConfigError(f"the pid file {path} belongs to uid {owner}, not to this user (uid {os.getuid()})")
    return parse_pid(text, f"the pid file {path}")


def parse_pid(text: str, source: str) -> int:
    # 0 and negative numbers would make kill(2) signal a whole process group.
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{source} contains {text[:32]!r}, which is not a process id")
    return int(text)


def pid_to_kill(environ: Mapping[str, str], pid_file: str | None) -> int:
    """Return the pid that ``run -k`` stops: the one in ``--pid-file``, else $SSH_AGENT_PID."""
    if pid_file:
        return read_pid_file(Path(pid_file))
    value = environ.get("SSH_AGENT_PID")
    if not value:
        raise ConfigError("SSH_AGENT_PID is not set, so there is no agent to stop; name one with --pid-file FILE")
    return parse_pid(value, "SSH_AGENT_PID")


def check_is_agent(pid: int) -> None:
    """Raise ConfigError unless ``pid`` is a ``tpmsigner-agent run`` process of this user.

    The check keeps a stale $SSH_AGENT_PID or pid file, whose pid the
    kernel may have given to another program since, from killing that
    program.
    """
    if pid == os.getpid():
        raise ConfigError(f"pid {pid} is this process, not a running agent")
    if _has_exited(pid):
        raise ConfigError(f"no process with pid {pid} is running; the agent has already stopped")
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        raise ConfigError(f"no process with pid {pid} is running; the agent has already stopped") from None
    except OSError as exc:
        raise ConfigError(f"cannot read /proc/{pid}: {exc.strerror}") from None

    names = [os.path.basename(argument.decode("utf-8", errors="replace")) for argument in arguments]
    # The installed program is ".../tpmsigner-agent"; "python -m tpmsigner_agent.cli" runs the same code.
    is_agent = any(name == "tpmsigner-agent" or name.startswith("tpmsigner_agent") for name in names)
    if not is_agent or "run" not in names:
        shown = " ".join(name for name in names if name)[:200]
        raise ConfigError(f"pid {pid} is not a tpmsigner-agent run process (it runs {shown!r}); not stopping it")

    real_uid = _real_uid(status)
    if real_uid != os.getuid():
        raise ConfigError(f"pid {pid} runs as uid {real_uid}, not as this user (uid {os.getuid()}); not stopping it")


def _real_uid(status: str) -> int | None:
    # proc(5): "Uid:" is followed by the real, effective, saved and filesystem uids.
    for line in status.splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    return None


def stop_agent(pid: int, timeout: float = KILL_TIMEOUT) -> None:
    """Send SIGTERM to ``pid`` and wait until it has exited; raise ConfigError if it does not."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        raise ConfigError(f"no process with pid {pid} is running; the agent has already stopped") from None
    deadline = time.monotonic() + timeout
    while not _has_exited(pid):
        if time.monotonic() >= deadline:
            raise ConfigError(f"the agent (pid {pid}) did not exit within {timeout:g} s of SIGTERM")
        time.sleep(_POLL_INTERVAL)


def _has_exited(pid: int) -> bool:
    """Tell whether ``pid`` is gone or a zombie that its parent has not reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    # The state follows the command name, which is in brackets and may
    # itself contain spaces and brackets (proc(5)).
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")
