"""OpenSSH's ssh-agent holding a tpm2-pkcs11 key, reached through tpm2-abrmd.

The stack is what a Debian user would run: libtpm2-pkcs11-1 loaded into
ssh-agent's PKCS#11 helper with ``ssh-add -s`` (the PIN is given once, then
never asked again), a token made with tpm2_ptool, and tpm2-abrmd as the
resource manager between them and the TPM.  tpm2-abrmd needs a D-Bus bus:
the benchmark starts a private one (its own ``dbus-daemon`` on a socket in
the work directory) and tpm2-abrmd with ``--session``, so the system bus
and system services are never touched.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .daemons import BenchSetupError, Daemon, run, wait_until

PROVIDER = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so"
DEBIAN_PACKAGES = ("libtpm2-pkcs11-1", "libtpm2-pkcs11-tools", "tpm2-abrmd", "libtss2-tcti-tabrmd0", "dbus-daemon")
TABRMD_TCTI = "tabrmd:bus_type=session"
SO_PIN = "bench-so-pin-0815"
TOKEN_LABEL = "bench"
KEY_LABEL = "bench-pkcs11"

_DBUS_CONFIG = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- A private session bus for tpm2-abrmd, written by the benchmark. -->
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def provider_path() -> Path:
    """Return the provider's real path, which ssh-agent's -P allow-list is matched against."""
    path = Path(PROVIDER)
    if not path.exists():
        raise BenchSetupError(f"{PROVIDER} is missing; install {' '.join(DEBIAN_PACKAGES)} (bench/run does)")
    return path.resolve()


@dataclass
class Pkcs11Agent:
    """dbus-daemon, tpm2-abrmd and ssh-agent with the tpm2-pkcs11 token loaded."""

    workdir: Path
    socket_path: Path
    tcti: str
    pin: str
    base_env: dict[str, str]
    daemons: list[Daemon] = field(default_factory=list)
    public_line: str = ""

    @property
    def store(self) -> Path:
        return self.workdir / "pkcs11-store"

    def _env(self, bus_address: str) -> dict[str, str]:
        environment = dict(self.base_env)
        environment.update(
            DBUS_SESSION_BUS_ADDRESS=bus_address,
            TPM2_PKCS11_STORE=str(self.store),
            TPM2_PKCS11_TCTI=TABRMD_TCTI,
            TPM2TOOLS_TCTI=TABRMD_TCTI,
            TSS2_LOG="all+NONE",
        )
        return environment

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        bus_socket = self.workdir / "dbus.sock"
        bus_socket.unlink(missing_ok=True)
        config = self.workdir / "dbus.conf"
        config.write_text(_DBUS_CONFIG.format(socket=bus_socket))
        dbus = Daemon.start(
            "dbus-daemon", ["dbus-daemon", f"--config-file={config}", "--nofork"], self.workdir / "dbus.log", self.base_env
        )
        self.daemons.append(dbus)
        wait_until(bus_socket.exists, 10, "the private D-Bus socket")
        env = self._env(f"unix:path={bus_socket}")

        abrmd = Daemon.start(
            "tpm2-abrmd",
            ["tpm2-abrmd", "--session", f"--tcti={self.tcti}", "--allow-root"],
            self.workdir / "abrmd.log",
            env,
        )
        self.daemons.append(abrmd)
        wait_until(lambda: _tabrmd_answers(env, abrmd), 15, "tpm2-abrmd to answer on the private bus")

        if not self.store.exists():
            self._make_token(env)

        agent = Daemon.start(
            "ssh-agent(pkcs11)",
            ["ssh-agent", "-D", "-a", str(self.socket_path), "-P", str(provider_path()) + "*"],
            self.workdir / "ssh-agent.log",
            env,
        )
        self.daemons.append(agent)
        # The socket file appears at bind(), a moment before ssh-agent listens.
        wait_until(lambda: _agent_answers(self.socket_path, agent), 10, "ssh-agent to answer on its socket")

        askpass = self.workdir / "askpass"
        askpass.write_text(f"#!/bin/sh\nprintf '%s\\n' '{self.pin}'\n")
        askpass.chmod(0o700)
        # ssh-add reads the PIN once, through SSH_ASKPASS since there is no terminal.
        add_env = dict(env, SSH_AUTH_SOCK=str(self.socket_path), SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force")
        add_env.pop("DISPLAY", None)
        run(["ssh-add", "-s", PROVIDER], add_env)
        listed = run(["ssh-add", "-L"], add_env).splitlines()
        if len(listed) != 1:
            raise BenchSetupError(f"ssh-agent lists {len(listed)} tpm2-pkcs11 keys, expected 1")
        self.public_line = listed[0]

    def _make_token(self, env: dict[str, str]) -> None:
        self.store.mkdir(mode=0o700)
        run(["tpm2_ptool", "init", f"--path={self.store}"], env)
        run(
            ["tpm2_ptool", "addtoken", "--pid=1", f"--label={TOKEN_LABEL}", f"--userpin={self.pin}",
             f"--sopin={SO_PIN}", f"--path={self.store}"],
            env,
        )
        run(
            ["tpm2_ptool", "addkey", f"--label={TOKEN_LABEL}", f"--userpin={self.pin}", "--algorithm=ecc256",
             f"--key-label={KEY_LABEL}", f"--path={self.store}"],
            env,
        )

    def stop(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()
        self.daemons.clear()
        self.socket_path.unlink(missing_ok=True)


def _agent_answers(socket_path: Path, agent: Daemon) -> bool:
    if agent.process.poll() is not None:
        raise BenchSetupError(f"ssh-agent exited with {agent.process.returncode}:\n{agent.log_text()}")
    if not socket_path.exists():
        return False
    environment = dict(os.environ, SSH_AUTH_SOCK=str(socket_path))
    # ssh-add -l exits with 1 for an agent without keys, 2 when it cannot connect.
    result = subprocess.run(["ssh-add", "-l"], env=environment, capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
    return result.returncode in (0, 1)


def _tabrmd_answers(env: dict[str, str], abrmd: Daemon) -> bool:
    if abrmd.process.poll() is not None:
        raise BenchSetupError(f"tpm2-abrmd exited with {abrmd.process.returncode}:\n{abrmd.log_text()}")
    try:
        run(["tpm2_getrandom", "--hex", "4"], env, timeout=10)
    except BenchSetupError:
        return False
    return True
