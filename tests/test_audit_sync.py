"""Audit records are written at once and reach the disk on a background thread."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tpmsigner import syncer
from tpmsigner.audit import AuditLog


def test_append_writes_before_background_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[tuple[str, int]] = []
    real_fsync = os.fsync
    release = threading.Event()

    def slow_fsync(fd: int) -> None:
        release.wait(10)   # a busy disk
        synced.append((threading.current_thread().name, os.fstat(fd).st_size))
        real_fsync(fd)

    monkeypatch.setattr(syncer.os, "fsync", slow_fsync)
    log = AuditLog(tmp_path / "audit.jsonl")
    for number in range(3):
        log.append({"request_id": number, "outcome": "approved"})

    # Every record is in the file although no fsync has finished yet.
    assert [record["request_id"] for record in log.records()] == [0, 1, 2]
    assert synced == []

    release.set()
    log.flush()
    size = (tmp_path / "audit.jsonl").stat().st_size
    assert synced and synced[-1] == ("fsync audit.jsonl", size)
    assert log.verify().ok


def test_synchronous_mode_fsyncs_in_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    callers: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        callers.append(threading.current_thread().name)
        real_fsync(fd)

    monkeypatch.setattr("tpmsigner.audit.os.fsync", recording_fsync)
    log = AuditLog(tmp_path / "audit.jsonl", sync_in_background=False)
    log.append({"request_id": 1, "outcome": "denied"})
    assert callers == [threading.current_thread().name]


def test_idle_sync_thread_exits_and_restarts(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"data\n")
    sync = syncer.BackgroundSync("fsync test", idle_exit=0.2)

    sync.request(path)
    assert sync.flush()
    deadline = time.monotonic() + 10
    while sync.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sync.is_running()

    sync.request(path)
    assert sync.is_running()
    assert sync.flush()
