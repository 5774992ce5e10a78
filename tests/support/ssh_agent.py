"""A real OpenSSH ssh-agent on a Unix socket, to compare against or to feed
ssh with keys that do not live in the TPM."""

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .processes import wait_until

START_TIMEOUT_SECONDS = 10
STOP_TIMEOUT_SECONDS = 5
SSH_ADD_TIMEOUT_SECONDS = 30

# sockaddr_un.sun_path on Linux has 108 bytes, including the final NUL.
MAX_UNIX_SOCKET_PATH_BYTES = 107


@dataclass
class OpenSshAgent:
    """An `ssh-agent -D` child process listening on socket_path."""

    socket_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        """Start ssh-agent and wait until it responds to `ssh-add -l`."""
        check_unix_socket_path(self.socket_path)
        log = open(self.socket_path.with_name(self.socket_path.name + ".log"), "wb")
        with log:
            # -D keeps the agent in the foreground as our child, so stop()
            # can wait for it and nothing outlives the test.
            self.process = subprocess.Popen(
                ["ssh-agent", "-D", "-a", str(self.socket_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._is_ready, START_TIMEOUT_SECONDS, f"ssh-agent on {self.socket_path}")

    def _is_ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"ssh-agent exited with code {self.process.returncode} during start-up")
        if not self.socket_path.exists():
            return False
        # ssh-add -l exits with 1 when the agent has no keys and with 2
        # when it cannot reach the agent.
        return self.ssh_add("-l", check=False).returncode in (0, 1)

    def ssh_add(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ssh-add against this agent only."""
        env = dict(os.environ, SSH_AUTH_SOCK=str(self.socket_path))
        # Without a terminal, ssh-add would otherwise try SSH_ASKPASS for a
        # passphrase. The test keys have none.
        env.pop("SSH_ASKPASS", None)
        env.pop("DISPLAY", None)
        return subprocess.run(
            ["ssh-add", *args],
            env=env,
            check=check,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=SSH_ADD_TIMEOUT_SECONDS,
        )

    def add_key(self, private_key: Path) -> None:
        self.ssh_add(str(private_key))

    def public_key_lines(self) -> list[str]:
        """Return the public keys in the agent, one OpenSSH line each."""
        result = self.ssh_add("-L", check=False)
        if result.returncode == 1:
            return []
        result.check_returncode()
        return result.stdout.splitlines()

    def stop(self) -> None:
        """Terminate the agent. Stopping twice is fine."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_SECONDS)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def check_unix_socket_path(path: Path) -> None:
    """Raise ValueError if path is too long to bind a Unix socket on Linux."""
    length = len(os.fsencode(path))
    if length > MAX_UNIX_SOCKET_PATH_BYTES:
        raise ValueError(
            f"Unix socket path {path} has {length} bytes, more than the Linux "
            f"maximum of {MAX_UNIX_SOCKET_PATH_BYTES}; use the short_tmp_path fixture"
        )
