"""Private files and directories, written atomically."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .errors import ConfigError, StateWriteError

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700, or tighten an existing one.

    Missing parent directories are created with the default mode, as
    ``mkdir -p`` does; only ``path`` itself must be private.

    An existing directory owned by another user is rejected, because its
    owner could swap the files we are about to trust.
    """
    try:
        path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{path} exists and is not a directory; choose another directory with --home") from None
    except OSError as exc:
        raise ConfigError(f"cannot create directory {path}: {exc.strerror}; choose another one with --home") from None
    info = path.stat()
    if info.st_uid != os.getuid():
        raise ConfigError(
            f"directory {path} is owned by uid {info.st_uid}, not by the current "
            f"user (uid {os.getuid()}); choose another directory with --home"
        )
    if info.st_mode & 0o777 != PRIVATE_DIR_MODE:
        os.chmod(path, PRIVATE_DIR_MODE)
    return path


def write_private_file(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically, mode 0600.

    The data goes to a temporary file in the same directory, is flushed to
    disk, and is renamed over the target, so a crash or a full disk leaves
    either the old file or the new one, never a mix.  The directory is
    fsynced so the rename itself survives a power loss.

    Raise StateWriteError, naming ``path``, when the new file cannot be
    written; the old file is then unchanged and no temporary file is left.
    """
    directory = path.parent
    try:
        _write_and_rename(path, data)
    except OSError as exc:
        hint = ". Free some disk space and try again" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise StateWriteError(
            f"cannot write {path}: {exc.strerror or exc}; the previous version of the file is unchanged{hint}"
        ) from exc

    fsync_directory(directory)


def _write_and_rename(path: Path, data: bytes) -> None:
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as temp_file:
            os.fchmod(temp_file.fileno(), PRIVATE_FILE_MODE)
            temp_file.write(data)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        raise


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries, so renames and unlinks in it survive a crash."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_secret_line(path: Path) -> str:
    """Return the first line of a PIN file, without its line ending.

    The error messages name the file but never its content.
    """
    try:
        with open(path, "rb") as pin_file:
            first_line = pin_file.readline(4096)
    except OSError as exc:
        raise ConfigError(f"cannot read PIN file {path}: {exc.strerror}") from None

    try:
        return first_line.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"PIN file {path} is not valid UTF-8") from None
