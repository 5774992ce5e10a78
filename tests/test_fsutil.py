"""Tests of tpmsigner.fsutil: private files, private directories and PIN files."""

import os
import stat
from pathlib import Path

import pytest

from tpmsigner import fsutil
from tpmsigner.errors import ConfigError, StateWriteError
from tpmsigner.fsutil import ensure_private_dir, read_secret_line, write_private_file

SECRET = b"s3cret-PIN-9731"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_write_private_file_creates_0600(tmp_path: Path, umask_022) -> None:
    path = tmp_path / "key"

    write_private_file(path, b"new content")

    assert path.read_bytes() == b"new content"
    assert mode_of(path) == 0o600


def test_write_private_file_ignores_umask_0(tmp_path: Path) -> None:
    path = tmp_path / "key"
    previous = os.umask(0)
    try:
        write_private_file(path, b"content")
    finally:
        os.umask(previous)

    assert mode_of(path) == 0o600


def test_write_private_file_replaces_and_tightens(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"old content that is longer than the new one")
    path.chmod(0o644)

    write_private_file(path, b"new")

    assert path.read_bytes() == b"new"
    assert mode_of(path) == 0o600


def test_write_private_file_replaces_inode(tmp_path: Path) -> None:
    # A rename puts a new inode in place, so a reader holding the old file
    # open still reads the complete old content.
    path = tmp_path / "key"
    path.write_bytes(b"old")

    with open(path, "rb") as old_file:
        write_private_file(path, b"new")
        old_content = old_file.read()

    assert old_content == b"old"
    assert path.read_bytes() == b"new"


def test_failed_replace_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"old")

    def failing_replace(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        write_private_file(path, b"new")

    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["key"]


def test_failed_fsync_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"old")

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fsutil.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        write_private_file(path, b"new")

    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["key"]


def test_failed_write_keeps_old_file(tmp_path: Path) -> None:
    # A str is not bytes, so the write into the binary temporary file raises.
    path = tmp_path / "key"
    path.write_bytes(b"old")

    with pytest.raises(TypeError):
        write_private_file(path, "not bytes")  # type: ignore[arg-type]

    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["key"]


def test_interrupt_removes_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"old")

    def interrupted_fsync(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(fsutil.os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        write_private_file(path, b"new")

    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["key"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_read_only_directory_keeps_old_file(tmp_path: Path) -> None:
    directory = tmp_path / "locked"
    directory.mkdir()
    path = directory / "key"
    path.write_bytes(b"old")
    directory.chmod(0o500)
    try:
        with pytest.raises(StateWriteError, match=f"cannot write {path}: Permission denied"):
            write_private_file(path, b"new")
    finally:
        directory.chmod(0o700)

    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(directory)) == ["key"]


def test_ensure_private_dir_creates_0700(tmp_path: Path, umask_022) -> None:
    path = tmp_path / "home"

    returned = ensure_private_dir(path)

    assert returned == path
    assert path.is_dir()
    assert mode_of(path) == 0o700


@pytest.mark.parametrize("mode", [0o755, 0o777, 0o750, 0o711])
def test_ensure_private_dir_tightens(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "home"
    path.mkdir()
    path.chmod(mode)

    ensure_private_dir(path)

    assert mode_of(path) == 0o700


def test_ensure_private_dir_keeps_contents(tmp_path: Path) -> None:
    path = tmp_path / "home"
    path.mkdir(mode=0o755)
    (path / "identity").write_bytes(b"kept")

    ensure_private_dir(path)

    assert (path / "identity").read_bytes() == b"kept"


def test_ensure_private_dir_creates_parents(tmp_path: Path, umask_022) -> None:
    path = tmp_path / "a" / "b" / "home"

    ensure_private_dir(path)

    assert mode_of(path) == 0o700
    assert (tmp_path / "a" / "b").is_dir()


def test_ensure_private_dir_parents_keep_umask(tmp_path: Path, umask_022) -> None:
    path = tmp_path / "parent" / "home"

    ensure_private_dir(path)

    # Parents get the umask default, as with mkdir -p; only the leaf is private.
    assert mode_of(tmp_path / "parent") == 0o755
    assert mode_of(path) == 0o700


def test_ensure_private_dir_rejects_other_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "home"
    path.mkdir(mode=0o755)
    owner = path.stat().st_uid
    other_uid = owner + 4242

    monkeypatch.setattr(fsutil.os, "getuid", lambda: other_uid)
    with pytest.raises(ConfigError, match=f"owned by uid {owner}, not by the current user \\(uid {other_uid}\\)"):
        ensure_private_dir(path)
    monkeypatch.undo()

    # The mode of a directory that belongs to someone else stays as it was.
    assert mode_of(path) == 0o755


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (SECRET + b"\nsecond line\n", SECRET.decode()),
        (SECRET + b"\r\n", SECRET.decode()),
        (SECRET, SECRET.decode()),
        (b"pin with spaces \n", "pin with spaces "),
        ("pïn-ünïcode\n".encode("utf-8"), "pïn-ünïcode"),
        (b"\nsecond line\n", ""),
        (b"", ""),
    ],
    ids=["two lines", "crlf", "no newline", "trailing space", "utf-8", "empty first line", "empty file"],
)
def test_read_secret_line(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "pin"
    path.write_bytes(content)

    assert read_secret_line(path) == expected


def test_read_secret_line_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing-pin"

    with pytest.raises(ConfigError) as raised:
        read_secret_line(path)

    assert str(raised.value) == f"cannot read PIN file {path}: No such file or directory"


def test_read_secret_line_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        read_secret_line(tmp_path)

    assert str(raised.value) == f"cannot read PIN file {tmp_path}: Is a directory"


def test_invalid_utf8_error_hides_content(tmp_path: Path) -> None:
    path = tmp_path / "pin"
    path.write_bytes(SECRET + b"\xff\xfe" + SECRET + b"\n")

    with pytest.raises(ConfigError) as raised:
        read_secret_line(path)

    message = str(raised.value)
    assert message == f"PIN file {path} is not valid UTF-8"
    assert SECRET.decode() not in message
    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__ is True


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file with mode 0000")
def test_unreadable_error_hides_content(tmp_path: Path) -> None:
    path = tmp_path / "pin"
    path.write_bytes(SECRET + b"\n")
    path.chmod(0)

    with pytest.raises(ConfigError) as raised:
        read_secret_line(path)

    assert str(raised.value) == f"cannot read PIN file {path}: Permission denied"
