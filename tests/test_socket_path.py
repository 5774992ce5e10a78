"""Creating the agent's socket when another agent starts at the same moment."""

from __future__ import annotations

import fcntl
import os
import socket
import threading
from pathlib import Path

import pytest

from tpmsigner.errors import ConfigError
from tpmsigner_agent import socket_path
from tpmsigner_agent.socket_path import bind_agent_socket


def _leave_stale_socket(path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()


def test_stale_socket_replaced(short_tmp_path: Path) -> None:
    path = short_tmp_path / "agent.sock"
    _leave_stale_socket(path)

    listener = bind_agent_socket(path)
    try:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(path))
        probe.close()
        assert oct(path.stat().st_mode & 0o777) == "0o600"
    finally:
        listener.close()


@pytest.mark.parametrize("attempt", range(20))
def test_two_agents_racing_one_wins(short_tmp_path: Path, attempt: int) -> None:
    # Both find the same stale socket.  Exactly one must end up listening on
    # the path, and the other must report the live agent, never take its path.
    path = short_tmp_path / f"race-{attempt}.sock"
    _leave_stale_socket(path)
    start = threading.Barrier(2)
    results: list[object] = []

    def start_agent() -> None:
        start.wait(timeout=10)
        try:
            results.append(bind_agent_socket(path))
        except ConfigError as exc:
            results.append(exc)

    threads = [threading.Thread(target=start_agent) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    listeners = [result for result in results if isinstance(result, socket.socket)]
    errors = [result for result in results if isinstance(result, ConfigError)]
    try:
        assert len(listeners) == 1
        assert len(errors) == 1
        assert "another agent is already serving" in str(errors[0])
        # The winner's socket is the one at the path: a client reaches it.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(path))
        accepted, _ = listeners[0].accept()
        accepted.close()
        probe.close()
    finally:
        for listener in listeners:
            listener.close()


def test_directory_lock_held_too_long(short_tmp_path: Path) -> None:
    descriptor = os.open(short_tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    try:
        with pytest.raises(ConfigError, match="locked for 0.2 s"):
            with socket_path._directory_lock(short_tmp_path, timeout=0.2):  # noqa: SLF001
                pass
    finally:
        os.close(descriptor)
