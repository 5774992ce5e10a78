"""A listening socket passed by systemd socket activation, with sd_listen_fds(3)'s rules.

systemd passes the sockets of a .socket unit as file descriptors 3, 4, ...
(SD_LISTEN_FDS_START) and describes them in LISTEN_PID (the process they are
meant for), LISTEN_FDS (how many) and LISTEN_FDNAMES.  A process whose pid
is not LISTEN_PID inherited the variables by mistake and must ignore them.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

from tpmsigner.errors import ConfigError

logger = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def take_activated_socket(environ: MutableMapping[str, str] | None = None) -> socket.socket | None:
    """Return the listening socket systemd passed to this process, or None when there is none.

    The variables are removed from ``environ`` (default: ``os.environ``) in
    every case, as sd_listen_fds(1) does, so that programs this agent starts
    do not take the socket for theirs.  Raise ConfigError when the variables
    are meant for this process but are invalid, or when descriptor 3 is not
    a listening AF_UNIX SOCK_STREAM socket.
    """
    environ = os.environ if environ is None else environ
    pid_text, count_text = environ.get("LISTEN_PID"), environ.get("LISTEN_FDS")
    for name in _VARIABLES:
        environ.pop(name, None)
    if pid_text is None and count_text is None:
        return None

    pid = _parse_count("LISTEN_PID", pid_text)
    if pid != os.getpid():
        logger.warning(
            "ignoring LISTEN_FDS: LISTEN_PID=%d names another process than this one (pid %d); "
            "creating this agent's own socket instead",
            pid,
            os.getpid(),
        )
        return None
    count = _parse_count("LISTEN_FDS", count_text)
    if count < 1:
        logger.warning("ignoring LISTEN_FDS=%d: systemd passed no socket; creating this agent's own socket", count)
        return None

    # The agent serves one socket.  Any further descriptor is closed at
    # exec (FD_CLOEXEC, as sd_listen_fds sets it), so it leaks into no child.
    for extra in range(SD_LISTEN_FDS_START + 1, SD_LISTEN_FDS_START + count):
        try:
            os.set_inheritable(extra, False)
        except OSError:
            pass
    if count > 1:
        logger.warning("systemd passed %d sockets; serving only the first (file descriptor 3)", count)
    return _listening_unix_socket(SD_LISTEN_FDS_START)


def _parse_count(name: str, text: str | None) -> int:
    if text is None or not text.isascii() or not text.isdigit():
        raise ConfigError(
            f"invalid {name}={text!r} in the environment: socket activation sets LISTEN_PID and LISTEN_FDS "
            "to decimal numbers; unset both to run without it"
        )
    return int(text)


def _listening_unix_socket(fd: int) -> socket.socket:
    """Wrap ``fd`` as a socket after checking that it is a listening AF_UNIX SOCK_STREAM socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(
            f"socket activation passed file descriptor {fd}, but it is not a socket ({exc.strerror or exc}); "
            "check ListenStream= in the .socket unit"
        ) from None
    os.set_inheritable(fd, False)

    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ConfigError(
            f"socket activation passed a socket of family {socket.AddressFamily(sock.family).name} and type "
            f"{socket.SocketKind(sock.type).name}; the agent needs an AF_UNIX SOCK_STREAM socket, "
            "from ListenStream=PATH in the .socket unit"
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ConfigError(
            "socket activation passed a UNIX socket that is not listening; use ListenStream= in the .socket unit "
            "and leave Accept= at its default, no"
        )
    return sock


def socket_path(sock: socket.socket) -> str:
    """Return the path a UNIX socket is bound to, for messages and SSH_AUTH_SOCK."""
    name = sock.getsockname()
    if isinstance(name, bytes):
        # An abstract socket name starts with a NUL byte (unix(7)).
        return "@" + name[1:].decode("utf-8", errors="replace")
    return name
