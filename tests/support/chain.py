"""The whole tpmsigner chain as real processes: signer, agent and approver.

``Chain`` runs ``tpmsigner`` and ``tpmsigner-agent`` through their command
lines, exactly as a person would, against a given swtpm.  The approver is a
``command:`` program that the test steers through files:

- ``approver/decision``: ``approve`` (default) or ``deny``;
- ``approver/pin``: the PIN it prints when approving;
- ``approver/requests.jsonl``: one JSON object of TPMSIGNER_* variables per
  request it saw, appended as soon as the request arrives;
- ``approver/hold``: while this file exists, every approver waits before it
  decides;
- ``approver/delay-once``: a number of seconds that one approver, the first
  to take the file, waits before it decides.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import termios
from dataclasses import dataclass, field
from pathlib import Path

from .ports import LOCALHOST, free_port
from .processes import pid_is_running, wait_until

SIGNER_COMMAND = [sys.executable, "-m", "tpmsigner.cli"]
EMBEDDED_SIGNER_SCRIPT = Path(__file__).with_name("embedded_signer.py")
AGENT_COMMAND = [sys.executable, "-m", "tpmsigner_agent.cli"]
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

_APPROVER_SOURCE = """\
#!{python}
import json, os, pathlib, sys, time
directory = pathlib.Path({directory!r})
seen = {{k: v for k, v in os.environ.items() if k.startswith("TPMSIGNER_")}}
with open(directory / "requests.jsonl", "a") as log:
    log.write(json.dumps(seen) + "\\n")
taken = directory / f"delay-taken-{{os.getpid()}}"
try:
    os.rename(directory / "delay-once", taken)
    time.sleep(float(taken.read_text()))
except FileNotFoundError:
    pass
while (directory / "hold").exists():
    time.sleep(0.05)
decision = (directory / "decision").read_text().strip()
if decision != "approve":
    print("demo approver: refusing", file=sys.stderr)
    sys.exit(1)
print((directory / "pin").read_text().splitlines()[0])
"""


@dataclass
class ManagedProcess:
    """A started program with its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_file: Path

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def is_running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
                raise AssertionError(f"{self.name} did not stop within {STOP_TIMEOUT} s of SIGTERM; killed it")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)


@dataclass
class Chain:
    """Signer home, agent home, approver and the two daemons of one test."""

    workdir: Path
    socket_dir: Path
    tcti: str
    signer_port: int = field(default_factory=free_port)
    mdns: bool = False
    # Put before every tpmsigner and tpmsigner-agent command line, for
    # example to run them in another mount namespace (see small_disk.py).
    command_prefix: list[str] = field(default_factory=list)
    # Variables set for every command and daemon of the chain, e.g. PATH.
    extra_environment: dict[str, str] = field(default_factory=dict)
    signer: ManagedProcess | None = None
    agent: ManagedProcess | None = None

    def __post_init__(self) -> None:
        self.signer_home = self.workdir / "signer-home"
        self.agent_home = self.workdir / "agent-home"
        self.approver_dir = self.workdir / "approver"
        self.approver_dir.mkdir(parents=True, exist_ok=True)
        self.approver_program = self.approver_dir / "approve"
        self.approver_program.write_text(
            _APPROVER_SOURCE.format(python=sys.executable, directory=str(self.approver_dir))
        )
        self.approver_program.chmod(0o755)
        self.set_decision("approve")
        self.set_approver_pin("")
        self.agent_socket = self.socket_dir / "agent.sock"
        self.agent_audit_log = self.workdir / "state" / "tpmsigner-agent" / "audit.jsonl"
        # $XDG_CONFIG_HOME of every command: empty unless a test writes
        # tpmsigner/config.toml or tpmsigner-agent/config.toml in it.
        self.config_home = self.workdir / "config"
        self.signer_audit_log = self.signer_home / "audit.jsonl"
        self._logs = 0

    # ---- the approver ------------------------------------------------------

    def set_decision(self, decision: str) -> None:
        (self.approver_dir / "decision").write_text(decision + "\n")

    def set_approver_pin(self, pin: str) -> None:
        (self.approver_dir / "pin").write_text(pin + "\n")

    def hold_approvals(self) -> None:
        (self.approver_dir / "hold").touch()

    def release_approvals(self) -> None:
        (self.approver_dir / "hold").unlink(missing_ok=True)

    def delay_next_approval(self, seconds: float) -> None:
        """Make the next approver to start wait ``seconds`` before it decides; the others do not wait."""
        (self.approver_dir / "delay-once").write_text(f"{seconds}\n")

    def approver_requests(self) -> list[dict[str, str]]:
        path = self.approver_dir / "requests.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    # ---- commands ----------------------------------------------------------

    def environment(self) -> dict[str, str]:
        environment = dict(os.environ)
        environment["TPMSIGNER_TCTI"] = self.tcti
        # The agent's audit log goes under $XDG_STATE_HOME.
        environment["XDG_STATE_HOME"] = str(self.workdir / "state")
        environment["XDG_CONFIG_HOME"] = str(self.config_home)
        environment.pop("TPMSIGNER_HOME", None)
        environment.pop("TPMSIGNER_AGENT_HOME", None)
        environment.update(self.extra_environment)
        return environment

    def tpmsigner_command(self) -> list[str]:
        """Return the argv that runs ``tpmsigner`` on the signer's home, before the subcommand."""
        return [*self.command_prefix, *SIGNER_COMMAND, "--home", str(self.signer_home)]

    def tpmsigner(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.tpmsigner_command(), *args],
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def tpmsigner_agent(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.command_prefix, *AGENT_COMMAND, "--home", str(self.agent_home), *args],
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=30.0,
            check=check,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def keygen(self, label: str, pin: str) -> str:
        """Create a key with ``pin``, make the approver give that PIN, return the .pub line."""
        pin_file = self.workdir / f"{label}.pin"
        pin_file.write_text(pin + "\n")
        result = self.tpmsigner("keygen", label, "--pin-file", str(pin_file))
        self.set_approver_pin(pin)
        return result.stdout.strip()

    def pair(self, device_name: str = "test-laptop") -> None:
        """Allow the agent's key on the signer and pin the signer in the agent."""
        agent_key = self.tpmsigner_agent("id").stdout.strip()
        self.tpmsigner("allow", device_name, agent_key)
        signer_key = self.tpmsigner("id").stdout.strip()
        self.tpmsigner_agent("trust", "test-signer", f"{LOCALHOST}:{self.signer_port}", signer_key)

    # ---- daemons -----------------------------------------------------------

    def _spawn(
        self, name: str, argv: list[str], controlling_tty: int | None = None, ignore_hangup: bool = False
    ) -> ManagedProcess:
        """Start a daemon in a new session, with ``controlling_tty`` as its terminal if given.

        ``ignore_hangup`` sets SIGHUP to be ignored, as nohup does, so the
        daemon outlives the closing of its terminal.
        """
        self._logs += 1
        log_file = self.workdir / f"{name}-{self._logs}.log"
        argv = [*self.command_prefix, *argv]

        def take_terminal() -> None:
            if ignore_hangup:
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
            if controlling_tty is not None:
                fcntl.ioctl(controlling_tty, termios.TIOCSCTTY, 0)

        with open(log_file, "wb") as log:
            process = subprocess.Popen(
                argv,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=() if controlling_tty is None else (controlling_tty,),
                preexec_fn=take_terminal,
            )
        return ManagedProcess(name, process, log_file)

    def start_signer(
        self,
        *extra_args: str,
        approval_timeout: float = 20.0,
        approver: str | None = None,
        controlling_tty: int | None = None,
        ignore_hangup: bool = False,
    ) -> ManagedProcess:
        argv = [
            *SIGNER_COMMAND,
            "--home",
            str(self.signer_home),
            "serve",
            "--listen",
            f"{LOCALHOST}:{self.signer_port}",
            "--approver",
            approver or f"command:{self.approver_program}",
            "--approval-timeout",
            str(approval_timeout),
            # mDNS would multicast on the host's interfaces, so only a chain
            # inside a network namespace of its own turns it on.
            *([] if self.mdns else ["--no-mdns"]),
            *extra_args,
        ]
        signer = self._spawn("signer", argv, controlling_tty, ignore_hangup)
        self.signer = signer
        self._wait_for_log(signer, "signer listening on")
        return signer

    def start_embedded_signer(self, pin: str) -> ManagedProcess:
        """Start the library-built signer of embedded_signer.py, which approves every request with ``pin``."""
        pin_file = self.workdir / "embedded-signer.pin"
        pin_file.write_text(pin + "\n")
        argv = [
            sys.executable,
            str(EMBEDDED_SIGNER_SCRIPT),
            "--home",
            str(self.signer_home),
            "--listen",
            f"{LOCALHOST}:{self.signer_port}",
            "--pin-file",
            str(pin_file),
        ]
        signer = self._spawn("signer", argv)
        self.signer = signer
        self._wait_for_log(signer, "signer listening on")
        return signer

    def start_agent(self, *extra_args: str) -> ManagedProcess:
        argv = [
            *AGENT_COMMAND,
            "--home",
            str(self.agent_home),
            "run",
            "--socket",
            str(self.agent_socket),
            "--foreground",
            *extra_args,
        ]
        agent = self._spawn("agent", argv)
        self.agent = agent
        self._wait_for_log(agent, "agent listening on")
        return agent

    def _wait_for_log(self, managed: ManagedProcess, marker: str) -> None:
        def ready() -> bool:
            if not managed.is_running():
                raise AssertionError(f"{managed.name} exited with {managed.process.returncode}:\n{managed.log_text()}")
            return marker in managed.log_text()

        wait_until(ready, START_TIMEOUT, f"{managed.name} to log {marker!r}")

    def agent_environment(self) -> dict[str, str]:
        environment = self.environment()
        environment["SSH_AUTH_SOCK"] = str(self.agent_socket)
        return environment

    def ssh_add(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh-add", *args],
            env=self.agent_environment(),
            capture_output=True,
            text=True,
            timeout=60.0,
            stdin=subprocess.DEVNULL,
        )

    def stop(self) -> list[str]:
        """Stop both daemons; return the names of those that leaked."""
        leaked = []
        for managed in (self.agent, self.signer):
            if managed is None:
                continue
            managed.stop()
            if pid_is_running(managed.process.pid):
                managed.kill()
                leaked.append(managed.name)
        return leaked

    def logs(self) -> str:
        parts = []
        for path in sorted(self.workdir.glob("*.log")):
            parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')}")
        return "\n".join(parts)
