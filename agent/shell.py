"""The shell commands that ``run`` prints for ``eval``, in ssh-agent's sh and csh forms."""

from __future__ import annotations

import shlex
from collections.abc import Mapping

from tpmsigner.errors import ConfigError

SH = "sh"
CSH = "csh"


def shell_syntax(requested: str | None, environ: Mapping[str, str]) -> str:
    """Return ``requested``, else csh when $SHELL ends in "csh" (csh, tcsh), else sh, as ssh-agent chooses."""
    if requested is not None:
        return requested
    return CSH if environ.get("SHELL", "").endswith("csh") else SH


def _quote(syntax: str, value: str) -> str:
    """Quote ``value`` as one word for the shell that will eval the output."""
    if any(not character.isprintable() for character in value):
        raise ConfigError(f"the path {value!r} contains control characters, which a shell cannot read back; choose another")
    if syntax == CSH and "!" in value:
        # csh expands "!" as history even between single quotes.
        raise ConfigError(f"the path {value!r} contains '!', which csh cannot read back; choose another")
    return shlex.quote(value)


def start_commands(syntax: str, socket_path: str, pid: int, *, with_pid_variable: bool = True) -> str:
    """Return the lines that set SSH_AUTH_SOCK (and SSH_AGENT_PID) and echo the agent's pid.

    ssh-agent leaves out SSH_AGENT_PID in the foreground (-D), because the
    caller already has the process; ``with_pid_variable`` does the same.
    """
    path = _quote(syntax, socket_path)
    if syntax == CSH:
        lines = [f"setenv SSH_AUTH_SOCK {path};"]
        if with_pid_variable:
            lines.append(f"setenv SSH_AGENT_PID {pid};")
    else:
        lines = [f"SSH_AUTH_SOCK={path}; export SSH_AUTH_SOCK;"]
        if with_pid_variable:
            lines.append(f"SSH_AGENT_PID={pid}; export SSH_AGENT_PID;")
    lines.append(f"echo Agent pid {pid};")
    return "\n".join(lines) + "\n"


def kill_commands(syntax: str, pid: int) -> str:
    """Return the lines that ``run -k`` prints after stopping the agent, as ``ssh-agent -k`` does."""
    unset = "unsetenv" if syntax == CSH else "unset"
    return f"{unset} SSH_AUTH_SOCK;\n{unset} SSH_AGENT_PID;\necho Agent pid {pid} killed;\n"
