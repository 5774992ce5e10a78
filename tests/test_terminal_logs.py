"""Log lines wait while a PIN prompt is on serve's terminal, then follow it.

A log line in the middle of the prompt would break the prompt's line, and
a stream of them (a peer connecting again and again) could scroll the
request's summary out of sight while the person decides.
"""

from __future__ import annotations

import logging
import os
import pty
import re
import select
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from tpmsigner import logsetup
from tpmsigner.logsetup import OneLineFormatter, TerminalHoldingHandler, terminal_logs_held
from tpmsigner.protocol.messages import ProcessInfo
from tpmsigner.signer.approvers import ApprovalRequest, TtyApprover

READ_TIMEOUT = 10.0


class Terminal:
    """A pseudo-terminal: the test reads the controller side, the code under test writes the other."""

    def __init__(self) -> None:
        self.controller, self.terminal = pty.openpty()
        self.path = os.ttyname(self.terminal)
        self.output = b""

    def read_until(self, marker: bytes, timeout: float = READ_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the terminal never showed {marker!r}; it showed {self.output!r}")
            readable, _, _ = select.select([self.controller], [], [], remaining)
            if readable:
                self.output += os.read(self.controller, 4096)
        return self.text()

    def read_for(self, seconds: float) -> str:
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.controller], [], [], remaining)
            if readable:
                self.output += os.read(self.controller, 4096)
        return self.text()

    def text(self) -> str:
        return self.output.decode(errors="replace").replace("\r\n", "\n")

    def close(self) -> None:
        os.close(self.controller)
        os.close(self.terminal)


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    screen = Terminal()
    yield screen
    screen.close()


def _logger_on(stream, name: str) -> tuple[logging.Logger, logging.Handler]:
    handler = TerminalHoldingHandler(stream)
    handler.setFormatter(OneLineFormatter(journal=False))
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger, handler


def test_terminal_lines_wait_for_hold_end(terminal: Terminal) -> None:
    with open(terminal.path, "w", encoding="utf-8") as stream:
        logger, handler = _logger_on(stream, "tests.held")
        try:
            with terminal_logs_held():
                logger.info("written during the hold")
                assert "during the hold" not in terminal.read_for(0.3)
            screen_text = terminal.read_until(b"during the hold")
        finally:
            logger.removeHandler(handler)
    assert screen_text.count("written during the hold") == 1


def test_file_lines_not_held(tmp_path: Path) -> None:
    path = tmp_path / "serve.log"
    with open(path, "w", encoding="utf-8") as stream:
        logger, handler = _logger_on(stream, "tests.file")
        try:
            with terminal_logs_held():
                logger.info("written to a file")
                handler.flush()
                assert "written to a file" in path.read_text()
        finally:
            logger.removeHandler(handler)


def test_held_lines_beyond_limit_dropped(terminal: Terminal, monkeypatch: pytest.MonkeyPatch) -> None:
    # A new hold, so that no other test's records count here.  It keeps the
    # product's own limit, so the test fails if that limit goes away.
    monkeypatch.setattr(logsetup, "_hold", logsetup._Hold())  # noqa: SLF001
    total = logsetup.MAX_HELD_RECORDS + 2
    # The held lines are written when the hold ends, more than a terminal
    # buffers, so a thread reads them meanwhile.
    reader = threading.Thread(target=terminal.read_until, args=(f"line {total - 1}\r\n".encode(), 30.0))
    with open(terminal.path, "w", encoding="utf-8") as stream:
        logger, handler = _logger_on(stream, "tests.many")
        drop_logger, drop_handler = _logger_on(stream, "tpmsigner.logsetup")
        try:
            with terminal_logs_held():
                for number in range(total):
                    logger.info("line %d", number)
                reader.start()
        finally:
            logger.removeHandler(handler)
            drop_logger.removeHandler(drop_handler)
            drop_logger.propagate = True
    reader.join(timeout=40.0)
    screen_text = terminal.text()

    assert f"2 log lines were dropped while a prompt was on the terminal; the last {total - 2} follow" in screen_text
    shown = [int(number) for number in re.findall(r"tests\.many: line (\d+)$", screen_text, re.MULTILINE)]
    assert shown == list(range(2, total))


def test_tty_prompt_not_broken_by_logs(terminal: Terminal) -> None:
    request = ApprovalRequest(
        request_id=7,
        key_label="work",
        key_fingerprint="SHA256:test",
        device="laptop",
        process=ProcessInfo(),
        purpose="ssh-login",
        destination="alice@example.org",
    )
    approver = TtyApprover(tty_path=terminal.path, timeout=20)
    answers: list[str | None] = []

    with open(terminal.path, "w", encoding="utf-8") as stream:
        logger, handler = _logger_on(stream, "tests.prompt")
        try:
            prompting = threading.Thread(
                target=lambda: answers.append(
                    approver._prompt(request, time.monotonic() + 20, threading.Event())  # noqa: SLF001
                )
            )
            prompting.start()
            terminal.read_until(b"PIN for work")
            # A peer connecting meanwhile makes serve log.
            for number in range(3):
                logger.warning("device 'other' at 192.0.2.%d disconnected", number)
            during = terminal.read_for(0.3)
            os.write(terminal.controller, b"1234\n")
            prompting.join(timeout=READ_TIMEOUT)
            after = terminal.read_until(b"192.0.2.2 disconnected")
        finally:
            logger.removeHandler(handler)

    assert answers == ["1234"]
    assert "disconnected" not in during
    assert after.index("PIN for work") < after.index("192.0.2.0 disconnected")
    assert "1234" not in after
