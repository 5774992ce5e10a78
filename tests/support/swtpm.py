"""An swtpm TPM 2.0 emulator driven through swtpm/start and swtpm/stop."""

import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .processes import pid_is_running, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
START_SCRIPT = REPO_ROOT / "swtpm" / "start"
STOP_SCRIPT = REPO_ROOT / "swtpm" / "stop"

# The scripts bound their own waits (10 s to start, about 11 s to stop), so
# these only catch a script that hangs.
SCRIPT_TIMEOUT_SECONDS = 30
KILL_TIMEOUT_SECONDS = 5


@dataclass
class Swtpm:
    """A running or stopped swtpm with its own state directory.

    tcti is the string for tss2 and tpm2-pytss, `swtpm:host=127.0.0.1,port=N`.
    A restart keeps the TPM state and, if the ports are still free, the tcti.
    """

    state_dir: Path
    tcti: str = ""
    pid: int | None = None
    started_pids: list[int] = field(default_factory=list)

    @property
    def log_file(self) -> Path:
        return self.state_dir / "swtpm.log"

    @property
    def server_port(self) -> int:
        return int(self.tcti.rpartition("port=")[2])

    @property
    def ctrl_port(self) -> int:
        return int((self.state_dir / "ctrl-port").read_text())

    def start(self) -> str:
        """Start swtpm on state_dir and return the TCTI string.

        Raises RuntimeError with the script output if swtpm/start fails.
        """
        result = _run_script(START_SCRIPT, self.state_dir)
        lines = result.stdout.splitlines()
        if len(lines) != 1 or not lines[0].startswith("swtpm:host=127.0.0.1,port="):
            raise RuntimeError(
                f"swtpm/start printed {result.stdout!r} on stdout, expected one "
                f"TCTI line; its stderr was:\n{result.stderr}"
            )
        self.tcti = lines[0]
        self.pid = int((self.state_dir / "swtpm.pid").read_text())
        self.started_pids.append(self.pid)
        return self.tcti

    def stop(self) -> None:
        """Shut swtpm down through its control channel. Stopping twice is fine."""
        _run_script(STOP_SCRIPT, self.state_dir)
        self.pid = None

    def kill(self) -> None:
        """Send SIGKILL, as a crash would, and wait until the process is gone."""
        if self.pid is None:
            raise RuntimeError("swtpm is not running, so there is nothing to kill")
        pid = self.pid
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not pid_is_running(pid), KILL_TIMEOUT_SECONDS, f"swtpm pid {pid} to exit after SIGKILL")
        self.pid = None

    def is_running(self) -> bool:
        return self.pid is not None and pid_is_running(self.pid)

    def leaked_pids(self) -> list[int]:
        """Return the pids started by this object that are still running."""
        return [pid for pid in self.started_pids if pid_is_running(pid)]

    def log_text(self) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no swtpm log file)"
        return text or "(swtpm log is empty)"


def start_swtpm(state_dir: Path) -> Swtpm:
    """Start an swtpm whose state lives in state_dir, created if missing."""
    state_dir.mkdir(parents=True, exist_ok=True)
    swtpm = Swtpm(state_dir=state_dir)
    swtpm.start()
    return swtpm


def _run_script(script: Path, state_dir: Path) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            [str(script), str(state_dir)],
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT_SECONDS,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"{script.name} {state_dir} timed out after {SCRIPT_TIMEOUT_SECONDS}s") from error
    if result.returncode != 0:
        raise RuntimeError(
            f"{script.relative_to(REPO_ROOT)} {state_dir} failed with exit code "
            f"{result.returncode}:\n{result.stderr}"
        )
    return result
