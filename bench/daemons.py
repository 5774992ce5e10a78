"""Programs the benchmark starts, each with a log file, a readiness wait and a stop."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.005


class BenchSetupError(Exception):
    """A program the benchmark needs did not start or did not do its part."""


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchSetupError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL_INTERVAL)


@dataclass
class Daemon:
    """A started program, in a session of its own, logging to ``log_file``."""

    name: str
    process: subprocess.Popen[bytes]
    log_file: Path

    @classmethod
    def start(cls, name: str, argv: list[str], log_file: Path, env: Mapping[str, str] | None = None) -> "Daemon":
        with open(log_file, "ab") as log:
            process = subprocess.Popen(
                argv,
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(name, process, log_file)

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def wait_for_log(self, marker: str, timeout: float = START_TIMEOUT) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise BenchSetupError(f"{self.name} exited with {self.process.returncode}:\n{self.log_text()}")
            return marker in self.log_text()

        wait_until(ready, timeout, f"{self.name} to log {marker!r}")

    def cpu_ticks(self) -> int:
        """Return the user and system CPU time used so far, in clock ticks (/proc/PID/stat)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])

    def wait_idle(self, quiet: float = 0.3, timeout: float = 30.0) -> None:
        """Wait until the program has used no CPU for ``quiet`` seconds (e.g. after imports in the background)."""
        deadline = time.monotonic() + timeout
        last = self.cpu_ticks()
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = self.cpu_ticks()
            if now == last:
                return
            last = now

    def rss_kib(self) -> int:
        """Return the resident set size from /proc (VmRSS), in KiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise BenchSetupError(f"{self.name}: no VmRSS in /proc/{self.process.pid}/status")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the whole session if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=STOP_TIMEOUT)


def run(argv: list[str], env: Mapping[str, str] | None = None, timeout: float = 120.0) -> str:
    """Run a setup command; return its stdout or raise BenchSetupError with its output."""
    result = subprocess.run(
        argv, env=dict(env) if env is not None else None, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise BenchSetupError(f"{' '.join(argv[:3])} ... failed with {result.returncode}:\n{result.stdout}{result.stderr}")
    return result.stdout
