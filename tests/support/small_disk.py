"""A small tmpfs in a private mount namespace, to fill a disk for real.

``SmallDisk`` mounts a tmpfs of a few hundred KiB over an existing
directory, in a mount namespace of its own, so the rest of the machine
keeps seeing the directory as it was.  Programs started through
``wrap(argv)`` enter that namespace with nsenter and see the tmpfs.  The
test itself reads and writes it through ``view(path)``, which goes through
the namespace's root under /proc.  ``fill()`` writes a filler file until
the kernel reports ENOSPC.

Creating a mount namespace needs root (CAP_SYS_ADMIN); ``start`` raises
SmallDiskUnavailable, with unshare's error, where the machine forbids it.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
FILLER_NAME = ".filler"
PAGE = 4096

# Mount the tmpfs, report readiness, then hold the namespace open until
# stdin closes.  `exec cat` keeps the pid that the test enters and views.
_HOLDER_SCRIPT = 'mount -t tmpfs -o "size=$2,mode=0700" tpmsigner-test "$1" && echo ready && exec cat >/dev/null'


class SmallDiskUnavailable(RuntimeError):
    """The machine does not allow a private mount namespace with a tmpfs."""


@dataclass
class SmallDisk:
    """A tmpfs of ``size`` bytes over ``mountpoint``, seen only inside its mount namespace."""

    mountpoint: Path
    size: int = 256 * 1024
    process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                *("unshare", "--mount", "--propagation", "private", "--"),
                *("sh", "-c", _HOLDER_SCRIPT, "sh", str(self.mountpoint), str(self.size)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        readable, _, _ = select.select([self.process.stdout], [], [], START_TIMEOUT)
        line = self.process.stdout.readline() if readable else ""
        if line.strip() != "ready":
            self.stop()
            assert self.process.stderr is not None
            reason = self.process.stderr.read().strip() or "unshare printed no error"
            raise SmallDiskUnavailable(f"cannot mount a tmpfs in a private mount namespace: {reason}")

    @property
    def pid(self) -> int:
        assert self.process is not None, "start() has not been called"
        return self.process.pid

    def view(self, path: Path) -> Path:
        """Return ``path`` as the namespace sees it, for the test process to read or write."""
        return Path(f"/proc/{self.pid}/root") / Path(path).resolve().relative_to("/")

    def wrap(self, argv: list[str]) -> list[str]:
        """Return ``argv`` prefixed to run inside the namespace, in the current directory."""
        return ["nsenter", f"--target={self.pid}", "--mount", f"--wd={os.getcwd()}", "--", *argv]

    def copy_in(self, source: Path) -> None:
        """Copy the directory tree ``source``, modes included, onto the tmpfs."""
        shutil.copytree(source, self.view(self.mountpoint), dirs_exist_ok=True)

    def fill(self, pages_left: int = 0) -> int:
        """Write a filler file until the tmpfs is full, then give back ``pages_left`` pages; return its size.

        tmpfs counts space in whole pages, so with one page left the next
        new file fits if it is at most one page long, and the one after
        that does not.
        """
        filler = self.view(self.mountpoint) / FILLER_NAME
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        written = 0
        try:
            while True:
                try:
                    written += os.write(fd, b"\0" * PAGE)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
            written -= written % PAGE + pages_left * PAGE
            os.ftruncate(fd, written)
        finally:
            os.close(fd)
        return written

    def free(self) -> None:
        """Remove the filler file."""
        (self.view(self.mountpoint) / FILLER_NAME).unlink(missing_ok=True)

    def free_bytes(self) -> int:
        info = os.statvfs(self.view(self.mountpoint))
        return info.f_bavail * info.f_frsize

    def stop(self) -> None:
        """End the holder process; the namespace goes once no process started in it runs."""
        if self.process is None or self.process.poll() is not None:
            return
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)
