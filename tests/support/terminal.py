"""Run a program on a pseudo-terminal and answer its prompts, as a person would."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import time
from pathlib import Path

STOP_TIMEOUT = 10.0


class TerminalProcess:
    """A program whose stdin, stdout and stderr are one new pseudo-terminal.

    ``output`` holds everything the program wrote so far, with the terminal's
    CRLF line endings turned back into LF.
    """

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
        self.argv = argv
        controller, terminal = pty.openpty()
        self._controller = controller
        self.process = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            start_new_session=True,
        )
        os.close(terminal)
        self.output = ""

    def _read_available(self, wait: float) -> bool:
        ready, _, _ = select.select([self._controller], [], [], wait)
        if not ready:
            return False
        try:
            chunk = os.read(self._controller, 4096)
        except OSError:   # EIO once the program has exited and closed the terminal
            return False
        if not chunk:
            return False
        self.output += chunk.decode("utf-8", errors="replace").replace("\r\n", "\n")
        return True

    def expect(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Wait until the output matches the regular expression ``pattern``; return the match."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.output)
            if match:
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.argv[-1]!r} did not print {pattern!r} within {timeout:g} s; its output:\n{self.output}"
                )
            if not self._read_available(min(remaining, 0.2)) and self.process.poll() is not None:
                # Drain what is left, then give up if it still does not match.
                while self._read_available(0):
                    pass
                match = re.search(pattern, self.output)
                if match:
                    return match
                raise AssertionError(
                    f"{self.argv[-1]!r} exited with {self.process.returncode} before printing {pattern!r}; "
                    f"its output:\n{self.output}"
                )

    def send_line(self, text: str) -> None:
        os.write(self._controller, text.encode("utf-8") + b"\n")

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the program to exit, collecting its output; return the exit status."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.argv!r} did not exit within {timeout:g} s; its output:\n{self.output}")
            self._read_available(0.1)
        while self._read_available(0.05):
            pass
        return self.process.returncode

    def close(self) -> None:
        """Stop the program if it still runs and release the terminal."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
        os.close(self._controller)


class PseudoTerminal:
    """A pseudo-terminal whose terminal side a daemon takes as its controlling terminal.

    The test reads what programs show on it through ``expect`` and types
    through ``write``.  ``output`` holds everything shown so far, with the
    terminal's CRLF line endings turned back into LF.
    """

    def __init__(self) -> None:
        self.controller, self.terminal = pty.openpty()
        self.path = os.ttyname(self.terminal)
        self.output = ""

    def _read_available(self, wait: float) -> bool:
        ready, _, _ = select.select([self.controller], [], [], wait)
        if not ready:
            return False
        try:
            chunk = os.read(self.controller, 4096)
        except OSError:
            return False
        self.output += chunk.decode("utf-8", errors="replace").replace("\r\n", "\n")
        return bool(chunk)

    def expect(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Wait until the output matches the regular expression ``pattern``; return the match."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.output)
            if match:
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the terminal did not show {pattern!r} within {timeout:g} s; it showed:\n{self.output!r}")
            self._read_available(min(remaining, 0.2))

    def drain(self, wait: float = 0.2) -> str:
        """Collect what arrives until nothing more comes for ``wait`` seconds; return all output."""
        while self._read_available(wait):
            pass
        return self.output

    def write(self, data: bytes) -> None:
        os.write(self.controller, data)

    def close(self) -> None:
        os.close(self.controller)
        os.close(self.terminal)
