"""An append-only, hash-chained audit log of signature requests (JSON lines).

Each line is a JSON object with a ``prev`` field: the SHA-256 of the line
before it, as hex (64 zeros for the first line).  Editing, removing or
reordering a line breaks the chain at the line after it, which ``verify``
reports.  An edit of the newest line shows only once another line follows.
Someone who can write the file can still rebuild a whole new chain, so the
chain shows accidents and clumsy edits, not a determined attacker with write
access; copying the log off the host regularly closes that gap.

When the file grows past ``max_bytes`` it is renamed to ``FILE.1`` (older
files move up to ``FILE.2`` and so on, up to ``keep`` files) and a new file
starts.  The chain continues across files: the new file's first line points
at the last line of ``FILE.1``, and ``verify`` walks the files oldest first.

Several processes may append to one log, for example two agents with the
same state directory.  Each append holds an exclusive flock(2) on
``FILE.lock`` and reads the last line from the file itself, so the chain
stays one chain.  A line that a crash of the host cut short (no line end,
or a tail of zero bytes) is removed before the next line is written, with
a warning, because a line appended after it would be joined to it.

Lines never contain a PIN or the data that was signed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import ConfigError, StateWriteError
from .fsutil import ensure_private_dir
from .syncer import BackgroundSync, sync_file
from .jsonutil import parse_json
from .printable import escape_nonprintable
from .protocol.messages import FailureCode

logger = logging.getLogger(__name__)

GENESIS = "0" * 64
# How long an append waits for another process's append to finish.  A
# write takes microseconds, so only a stopped or hung writer makes it
# wait this long, and the caller's event loop waits with it.
LOCK_TIMEOUT = 2.0
_LOCK_POLL_INTERVAL = 0.01
# Bytes read at a time when looking for the last line from the end of a file.
_TAIL_CHUNK = 8192

# Outcomes a request can end with, as recorded in the ``outcome`` field.
# "signed" is a request that the agent forwarded to an upstream ssh-agent,
# which signed it without a tpmsigner approval.
OUTCOMES = ("approved", "denied", "wrong_pin", "locked_out", "timed_out", "unreachable", "error", "signed")

_OUTCOMES_BY_FAILURE = {
    FailureCode.DENIED: "denied",
    FailureCode.WRONG_PIN: "wrong_pin",
    FailureCode.LOCKED_OUT: "locked_out",
    FailureCode.TIMED_OUT: "timed_out",
}


def outcome_for_failure(code: int) -> str:
    """Map a signer failure code to an audit outcome; codes without their own outcome are "error"."""
    return _OUTCOMES_BY_FAILURE.get(code, "error")


@dataclass(frozen=True)
class VerifyResult:
    """The first line where the chain breaks, if any."""

    lines: int
    first_bad_line: int | None = None   # 1-based, within ``file``
    reason: str = ""
    file: Path | None = None

    @property
    def ok(self) -> bool:
        return self.first_bad_line is None


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def utc_timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class AuditLog:
    """One audit log file; appends are serialised and flushed to disk.

    Each record is written before ``append`` returns; the fsync that takes
    it to the disk runs on a background thread right after (see
    tpmsigner/syncer.py), unless ``sync_in_background`` is false.
    """

    def __init__(
        self, path: Path, max_bytes: int = 10 * 1024 * 1024, keep: int = 5, sync_in_background: bool = True
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        # The lock file that serialises appends from all processes, with flock(2).
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock = threading.Lock()
        self._syncer = BackgroundSync(f"fsync {self.path.name}") if sync_in_background else None
        # The current file as this object left it after its last append, and
        # the hash of the line it wrote.  While the file is unchanged, the
        # next append needs no read.
        self._written: tuple[tuple[int, int, int, int], str] | None = None

    def flush(self) -> None:
        """Wait until every appended record is on the disk."""
        if self._syncer is not None and not self._syncer.flush():
            raise OSError(f"flushing the audit log {self.path} to disk did not finish in time")

    def _rotated(self, number: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{number}")

    def files(self) -> list[Path]:
        """Return the existing log files, oldest first."""
        older = [self._rotated(number) for number in range(self.keep, 0, -1) if self._rotated(number).exists()]
        return older + ([self.path] if self.path.exists() else [])

    def _rotate(self) -> None:
        # The file keeps its inode when renamed; its last records go to
        # disk now, as the background fsync names the path, not the file.
        sync_file(self.path)
        oldest = self._rotated(self.keep)
        if oldest.exists():
            oldest.unlink()
        for number in range(self.keep - 1, 0, -1):
            if self._rotated(number).exists():
                os.replace(self._rotated(number), self._rotated(number + 1))
        os.replace(self.path, self._rotated(1))

    def append(self, record: dict[str, object]) -> dict[str, object]:
        """Append ``record`` with its time and chain fields; return what was written.

        Raise StateWriteError when the line cannot be written or another
        process holds the log's lock for more than LOCK_TIMEOUT seconds.
        """
        ensure_private_dir(self.path.parent)
        with self._lock, self._exclusive_lock():
            fd = self._open_current()
            try:
                size = self._cut_incomplete_line(fd)
                entry = {"time": utc_timestamp(), **record, "prev": self._hash_of_last_line(fd)}
                line = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode("utf-8")
                if size and size + len(line) > self.max_bytes:
                    os.close(fd)
                    fd = -1
                    self._rotate()
                    fd = self._open_current()
                self._append_line(fd, line + b"\n", sync=self._syncer is None)
                self._written = (_file_state(fd), line_hash(line))
            finally:
                if fd >= 0:
                    os.close(fd)
            if self._syncer is not None:
                self._syncer.request(self.path)
            return entry

    def _open_current(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @contextlib.contextmanager
    def _exclusive_lock(self) -> Iterator[None]:
        """Hold the flock on ``lock_path``, waiting at most LOCK_TIMEOUT seconds for it."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise StateWriteError(
                f"cannot open the audit log's lock file {self.lock_path}: {exc.strerror or exc}"
            ) from exc
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StateWriteError(
                            f"another process has held the lock {self.lock_path} of the audit log for "
                            f"{LOCK_TIMEOUT:g} s; is a tpmsigner process stopped or hung?"
                        ) from None
                    time.sleep(_LOCK_POLL_INTERVAL)
            yield
        finally:
            os.close(fd)

    def _cut_incomplete_line(self, fd: int) -> int:
        """Remove the end of the open current file after its last line end, with a warning; return its size.

        A crash in the middle of a write leaves such a tail.  A write that
        fails with an error does not, because ``_append_line`` undoes it.
        """
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return size
        keep = _end_of_last_line(fd, size)
        try:
            os.ftruncate(fd, keep)
        except OSError as exc:
            raise StateWriteError(
                f"cannot remove the incomplete last line of the audit log {self.path}: {exc.strerror or exc}"
            ) from exc
        logger.warning(
            "the audit log %s ended in an incomplete line of %d bytes, left by a crash during a write. "
            "Removed it, so that the next record starts on a line of its own",
            self.path,
            size - keep,
        )
        return keep

    def _append_line(self, fd: int, line: bytes, sync: bool) -> None:
        """Write ``line`` at the end of the open log (and fsync it if ``sync``), or leave the log as it was.

        A full disk can take the first part of a line and reject the rest,
        so after any failure the file is cut back to its old size: a partial
        line would break the chain for every later line.
        """
        size_before = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
            if sync:
                os.fsync(fd)
        except OSError as exc:
            os.ftruncate(fd, size_before)
            raise StateWriteError(
                f"cannot append to the audit log {self.path}: {exc.strerror or exc}; the log is unchanged"
            ) from exc

    def _hash_of_last_line(self, fd: int) -> str:
        """Return the hash of the newest line, in the open current file or else in the rotated ones.

        Returns GENESIS when there is no line at all.
        """
        if self._written is not None and self._written[0] == _file_state(fd):
            return self._written[1]
        last = _last_line(fd)
        if last:
            return line_hash(last)
        for path in reversed(self.files()[:-1] if self.path.exists() else self.files()):
            with open(path, "rb") as log_file:
                last = _last_line(log_file.fileno())
            if last:
                return line_hash(last)
        return GENESIS

    def records(self) -> list[dict[str, object]]:
        """Return every record, oldest first; a line that is not a JSON object raises ConfigError naming it."""
        records = []
        for path in self.files():
            with open(path, "rb") as log_file:
                for number, line in enumerate(log_file, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = parse_json(line)
                    except ValueError:
                        raise ConfigError(f"{path}: line {number} is not JSON; run 'audit verify'") from None
                    if not isinstance(record, dict):
                        raise ConfigError(f"{path}: line {number} is not a JSON object; run 'audit verify'")
                    records.append(record)
        return records

    def last(self) -> dict[str, object] | None:
        records = self.records()
        return records[-1] if records else None

    def verify(self) -> VerifyResult:
        """Check the chain across all files; report the first line that breaks it.

        The oldest kept file may start in the middle of the chain, because
        its predecessors were rotated away, so its first line is trusted.
        """
        expected: str | None = None
        count = 0
        previous_file = ""
        for path in self.files():
            with open(path, "rb") as log_file:
                for number, line in enumerate(log_file, start=1):
                    count += 1
                    try:
                        entry = parse_json(line)
                    except ValueError:
                        return VerifyResult(count, number, "the line is not valid JSON", path)
                    if not isinstance(entry, dict):
                        return VerifyResult(count, number, "the line is not a JSON object", path)
                    if expected is not None and entry.get("prev") != expected:
                        # The hash names the line before, so the edit may be
                        # there rather than here.
                        previous = f"line {number - 1}" if number > 1 else f"the last line of {previous_file}"
                        return VerifyResult(
                            count,
                            number,
                            f"its 'prev' hash does not match {previous}: {previous} was edited, or lines "
                            "between the two were removed, inserted or reordered",
                            path,
                        )
                    if expected is None and len(self.files()) == 1 and entry.get("prev") != GENESIS:
                        return VerifyResult(count, number, "the log's first lines were removed", path)
                    expected = line_hash(line)
            previous_file = path.name
        return VerifyResult(lines=count)


def _file_state(fd: int) -> tuple[int, int, int, int]:
    """Return what changes when anyone writes, truncates or replaces the file: device, inode, size, mtime."""
    info = os.fstat(fd)
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _end_of_last_line(fd: int, size: int) -> int:
    """Return the offset just after the last line end in the first ``size`` bytes of ``fd``, or 0."""
    end = size
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def _last_line(fd: int) -> bytes:
    """Return the last line of ``fd`` that is not blank, without its line end, or b"" if there is none."""
    end = os.fstat(fd).st_size
    tail = b""
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        tail = os.pread(fd, end - start, start) + tail
        end = start
        lines = [line for line in tail.split(b"\n") if line.strip()]
        # The first piece may be the end of a longer line, unless the
        # whole file has been read.
        if len(lines) > 1 or (lines and end == 0):
            return lines[-1]
    return b""


def parse_since(value: str) -> datetime:
    """Parse ``--since``; a time without a zone is taken as UTC."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"invalid --since {value!r}: use an ISO 8601 time such as 2026-12-04T10:00") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def audit_command(log: AuditLog, action: str, since: str | None, as_json: bool) -> int:
    """Run ``audit show`` or ``audit verify`` on ``log`` for either program; return the exit status."""
    if not log.files():
        print(f"{log.path}: no audit log here yet (nothing was recorded, or it was removed)", file=sys.stderr)
        return 1 if action == "verify" else 0
    if action == "verify":
        result = log.verify()
        if result.ok:
            # Removing the newest lines, or editing the very last one, leaves
            # a chain that verifies, so the count is worth comparing.
            print(f"{log.path}: {result.lines} entries, chain intact")
            return 0
        print(f"{result.file}: line {result.first_bad_line}: {result.reason}", file=sys.stderr)
        return 1
    print_audit(log.records(), since=since, as_json=as_json)
    return 0


def print_audit(records: list[dict[str, object]], since: str | None = None, as_json: bool = False) -> None:
    """Print audit records, one per line, readably or as JSON."""
    threshold = parse_since(since) if since else None
    for record in records:
        if threshold is not None and _recorded_before(record, threshold):
            continue
        if as_json:
            print(json.dumps(record, sort_keys=True))
            continue
        destination = record.get("destination") or {}
        where = ""
        if isinstance(destination, dict) and destination.get("user"):
            host = destination.get("host") or "?"
            flags = "verified" if destination.get("verified") else "unverified"
            if destination.get("forwarded"):
                flags += ", forwarded"
            where = f" {destination['user']}@{host} ({flags})"
        who = record.get("device") or record.get("command_line") or ""
        key = f"key {record.get('key_fingerprint', '?')}"
        if record.get("key_label"):
            key = f"key {record['key_label']} ({record.get('key_fingerprint', '?')})"
        if record.get("signer"):
            where += f" via signer {record['signer']}"
        # Fields are formatted with str(): a damaged or edited line may hold
        # any JSON value where a string belongs.
        outcome = str(record.get("outcome", "?"))
        if record.get("upstream"):
            where += f" (upstream agent {record['upstream']})"
        # A command line, a user name or an SSHSIG namespace came from a peer.
        print(
            escape_nonprintable(
                f"{record.get('time')}  {outcome:<11}  {record.get('purpose', '?')}{where}  "
                f"{key}  by {who}"
                + (f"  -- {record['reason']}" if record.get("reason") else "")
            )
        )


def _recorded_before(record: dict[str, object], threshold: datetime) -> bool:
    """Return True if the record's time is before ``threshold``; a time that does not parse is never before it."""
    try:
        moment = datetime.fromisoformat(str(record.get("time")))
    except ValueError:
        return False
    # parse_since takes a time without a zone as UTC, and so does this.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment < threshold
