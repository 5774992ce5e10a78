"""A real OpenSSH sshd on 127.0.0.1 with its own host key and authorized_keys.

Tested with OpenSSH 9.2p1 (Debian 12). The daemon runs in the foreground as
a child of the test process, so stop() can reap it and nothing outlives the
test.
"""

import getpass
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .ports import LOCALHOST, free_port
from .processes import pid_is_running, wait_until
from .ssh_keys import generate_key_pair

SSHD = Path("/usr/sbin/sshd")
# sshd running as root checks that this privilege separation directory
# exists. Debian creates it only when its sshd service starts, which the
# tests never do.
PRIVSEP_DIR = Path("/run/sshd")

BIND_ATTEMPTS = 5
START_TIMEOUT_SECONDS = 10
STOP_TIMEOUT_SECONDS = 5
CONFIG_CHECK_TIMEOUT_SECONDS = 10
SSH_CONNECT_TIMEOUT_SECONDS = 10


@dataclass
class Sshd:
    """An sshd bound to 127.0.0.1:port that accepts only public key logins.

    workdir contains every file sshd uses: config, host key, authorized_keys,
    pid file, log and the known_hosts file for clients. extra_config lines go
    before the built-in settings, so they override them, because sshd uses
    the first value it reads for each keyword.
    """

    workdir: Path
    authorized_keys: Sequence[str] = ()
    extra_config: Sequence[str] = ()
    user: str = field(default_factory=getpass.getuser)
    port: int = 0
    host_public_key_line: str = ""
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def config_file(self) -> Path:
        return self.workdir / "sshd_config"

    @property
    def host_key(self) -> Path:
        return self.workdir / "ssh_host_ed25519_key"

    @property
    def authorized_keys_file(self) -> Path:
        return self.workdir / "authorized_keys"

    @property
    def known_hosts_file(self) -> Path:
        return self.workdir / "known_hosts"

    @property
    def log_file(self) -> Path:
        return self.workdir / "sshd.log"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "sshd.pid"

    @property
    def known_hosts_line(self) -> str:
        """The host key line for a known_hosts file, `[127.0.0.1]:PORT ssh-ed25519 ...`."""
        key_type, key_base64 = self.host_public_key_line.split()[:2]
        return f"[{LOCALHOST}]:{self.port} {key_type} {key_base64}"

    def start(self) -> None:
        """Start sshd on a free port and wait until it listens.

        Raises RuntimeError with the sshd log if it fails to start.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        _ensure_privsep_dir()
        if not self.host_key.exists():
            generate_key_pair(self.host_key, "ed25519", "sshd-host-key")
        self.host_public_key_line = self.host_key.with_name(self.host_key.name + ".pub").read_text().strip()
        self.set_authorized_keys(self.authorized_keys)

        for attempt in range(1, BIND_ATTEMPTS + 1):
            self.port = free_port()
            self.config_file.write_text(self._config_text())
            self._check_config()
            if self._start_on_port():
                break
            if attempt == BIND_ATTEMPTS:
                raise RuntimeError(f"sshd failed to bind a free port in {BIND_ATTEMPTS} attempts:\n{self.log_text()}")

        self.known_hosts_file.write_text(self.known_hosts_line + "\n")

    def _config_text(self) -> str:
        settings = [
            f"ListenAddress {LOCALHOST}:{self.port}",
            "AddressFamily inet",
            f"HostKey {self.host_key}",
            f"PidFile {self.pid_file}",
            f"AuthorizedKeysFile {self.authorized_keys_file}",
            "AuthorizedKeysCommand none",
            "AuthenticationMethods publickey",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "HostbasedAuthentication no",
            "GSSAPIAuthentication no",
            # NOTE: without PAM, an sshd running as root rejects a user whose
            # /etc/shadow password starts with "!" ("account is locked" in
            # the log), even for a public key login (OpenSSH 9.2p1). Pass
            # "UsePAM yes" in extra_config for such a user.
            "UsePAM no",
            # The tmp directories of pytest fail sshd's ownership and mode
            # checks on authorized_keys and its parent directories.
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            f"AllowUsers {self.user}",
            "LogLevel VERBOSE",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "AllowAgentForwarding no",
            "PermitTunnel no",
        ]
        lines = [
            "# Written by tests/support/sshd.py. Extra lines first, because",
            "# sshd uses the first value it reads for each keyword.",
            *self.extra_config,
            *settings,
        ]
        return "\n".join(lines) + "\n"

    def _check_config(self) -> None:
        result = subprocess.run(
            [str(SSHD), "-t", "-f", str(self.config_file)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=CONFIG_CHECK_TIMEOUT_SECONDS,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"sshd -t rejected the config {self.config_file}:\n{result.stderr}\n"
                f"config:\n{self.config_file.read_text()}"
            )

    def _start_on_port(self) -> bool:
        """Start sshd on self.port and return False if the port was taken."""
        log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with open(self.log_file, "ab") as log:
            # -D keeps sshd in the foreground as our child, -e sends its log
            # to stderr, which goes to the log file.
            self.process = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        listening = f"Server listening on {LOCALHOST} port {self.port}."

        def new_log_text() -> str:
            with open(self.log_file, "rb") as log:
                log.seek(log_offset)
                return log.read().decode(errors="replace")

        def started() -> bool:
            assert self.process is not None
            return self.process.poll() is not None or listening in new_log_text()

        try:
            wait_until(started, START_TIMEOUT_SECONDS, f"sshd to listen on {LOCALHOST}:{self.port}")
        except TimeoutError as error:
            self.stop()
            raise RuntimeError(f"{error}; sshd log:\n{self.log_text()}") from error

        if self.process.poll() is None:
            return True
        if "Address already in use" in new_log_text():
            return False
        raise RuntimeError(f"sshd exited with code {self.process.returncode} during start-up; sshd log:\n{self.log_text()}")

    def set_authorized_keys(self, public_key_lines: Sequence[str]) -> None:
        """Replace the authorized_keys file, which sshd rereads on every login."""
        self.authorized_keys = list(public_key_lines)
        text = "".join(line.strip() + "\n" for line in self.authorized_keys)
        self.authorized_keys_file.write_text(text)

    def ssh_command(
        self,
        agent_socket: Path | str,
        command: str,
        *,
        user: str | None = None,
        extra_options: Sequence[str] = (),
    ) -> list[str]:
        """Build an ssh argv that logs in with the keys of one agent only.

        ssh reads no config file (-F /dev/null), checks the host key against
        known_hosts_file only, and never prompts (BatchMode). Naming an
        IdentityFile that does not exist keeps ssh from trying the default
        key files in ~/.ssh, which it adds only when no IdentityFile is set
        (OpenSSH 9.2). After a failed login, ssh prints "no such identity"
        for that file on stderr. extra_options go before the destination, for example
        ["-v"] or ["-o", "PubkeyAcceptedAlgorithms=ecdsa-sha2-nistp256"].
        """
        options = {
            "IdentityAgent": str(agent_socket),
            "IdentitiesOnly": "no",
            "IdentityFile": str(self.workdir / "no-identity-file"),
            "UserKnownHostsFile": str(self.known_hosts_file),
            "GlobalKnownHostsFile": "/dev/null",
            "StrictHostKeyChecking": "yes",
            "UpdateHostKeys": "no",
            "BatchMode": "yes",
            "PreferredAuthentications": "publickey",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "HostbasedAuthentication": "no",
            "GSSAPIAuthentication": "no",
            "ControlMaster": "no",
            "ControlPath": "none",
            "ConnectTimeout": str(SSH_CONNECT_TIMEOUT_SECONDS),
        }
        argv = ["ssh", "-F", "/dev/null"]
        for name, value in options.items():
            argv += ["-o", f"{name}={value}"]
        argv += [*extra_options, "-p", str(self.port), f"{user or self.user}@{LOCALHOST}", command]
        return argv

    def stop(self) -> None:
        """Terminate the listening sshd and reap it. Stopping twice is fine.

        NOTE: a login session still open at this point keeps its own sshd
        process until the client disconnects. Only the listener is waited for.
        """
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

    def leaked_pids(self) -> list[int]:
        """Return the listener pid if it still runs, as the leak check for teardown."""
        if self.process is not None and pid_is_running(self.process.pid):
            return [self.process.pid]
        return []

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no sshd log file)"


def _ensure_privsep_dir() -> None:
    if PRIVSEP_DIR.is_dir():
        return
    if os.geteuid() != 0:
        # NOTE: an sshd that is not root skips privilege separation in
        # OpenSSH 9.2, so the directory is only needed when running as root.
        return
    PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
