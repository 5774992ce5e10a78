"""Create the agent's listening UNIX socket safely."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tpmsigner.errors import ConfigError

LISTEN_BACKLOG = 128
# Another agent holds the directory lock only while it binds its socket.
DIRECTORY_LOCK_TIMEOUT = 5.0


def default_socket_path() -> Path:
    """Return a socket path in a new 0700 directory, as ssh-agent does."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    directory = tempfile.mkdtemp(prefix="tpmsigner-agent.", dir=base)
    return Path(directory) / "agent.sock"


def _is_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise ConfigError(f"cannot check whether {path} is in use: {exc.strerror}") from None
    finally:
        probe.close()
    return True


# sun_path is 108 bytes on Linux, including the terminating NUL (unix(7)).
MAX_SOCKET_PATH = 107


def bind_agent_socket(path: Path) -> socket.socket:
    """Bind and listen on ``path``, mode 0600.

    A missing parent directory is created with mode 0700.  A leftover
    socket with no listener is replaced.  A live one is left alone, because
    another agent is serving on it.
    """
    path = Path(path)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"the socket path {path} is {len(os.fsencode(path))} bytes; UNIX socket paths "
            f"may have at most {MAX_SOCKET_PATH}. Choose a shorter --socket path"
        )
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)

    # Two agents started together on one path could both find the old socket
    # dead, and the second would unlink the first one's new socket before it
    # listens.  The check, unlink, bind and listen run under a lock on the
    # socket's directory, so the second one finds a live socket instead.
    with _directory_lock(path.parent):
        return _replace_and_bind(path)


def _replace_and_bind(path: Path) -> socket.socket:
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"{path} exists and is not a socket; choose another --socket path")
        if _is_live(path):
            raise ConfigError(f"another agent is already serving on {path}; stop it first or choose another path")
        path.unlink()

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot create the agent socket {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(LISTEN_BACKLOG)
    return sock


@contextmanager
def _directory_lock(directory: Path, timeout: float = DIRECTORY_LOCK_TIMEOUT) -> Iterator[None]:
    """Hold an exclusive flock(2) on ``directory`` for the duration of the block."""
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        # A directory this user may enter but not read cannot be locked.
        # Binding still works, only without protection from a racing agent.
        yield
        return
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ConfigError(
                        f"another process kept {directory} locked for {timeout:g} s while this agent tried to "
                        "create its socket there; try again, or choose another --socket path"
                    ) from None
                time.sleep(0.01)
        yield
    finally:
        os.close(descriptor)
