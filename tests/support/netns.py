"""A private network namespace for tests that use mDNS (zeroconf).

zeroconf multicasts on every interface it is given, so tests that start it
run the programs involved inside a new network namespace whose only
interface is its own loopback, with multicast on and a route for
224.0.0.0/4.  Nothing sent there reaches the host's real interfaces.
A ``sleep`` process started by ``unshare -n`` holds the namespace open, and
every program joins it with ``nsenter --net=/proc/PID/ns/net``.  Creating
it needs root (CAP_SYS_ADMIN).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from .chain import AGENT_COMMAND, SIGNER_COMMAND, Chain, ManagedProcess
from .processes import pid_is_running, wait_until

SETUP_SCRIPT = "ip link set lo up multicast on && ip route add 224.0.0.0/4 dev lo && exec sleep infinity"
READY_TIMEOUT = 10.0


class NetworkNamespace:
    """A new network namespace, alive until close()."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "--net", "bash", "-c", SETUP_SCRIPT],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            wait_until(self._ready, READY_TIMEOUT, "the network namespace to be set up")
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> str:
        return f"/proc/{self.holder.pid}/ns/net"

    def _ready(self) -> bool:
        if self.holder.poll() is not None:
            raise AssertionError(f"unshare --net exited with {self.holder.returncode}: {self.holder.stderr.read()!r}")
        # unshare execs bash, which execs sleep once the set-up commands succeeded.
        try:
            command = Path(f"/proc/{self.holder.pid}/comm").read_text().strip()
        except FileNotFoundError:
            return False
        return command == "sleep" and os.readlink(self.path) != os.readlink("/proc/self/ns/net")

    def command(self, argv: list[str]) -> list[str]:
        """Return ``argv`` prefixed so that it runs inside this namespace."""
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 30)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.command(argv), **kwargs)

    def close(self) -> None:
        if self.holder.poll() is None:
            self.holder.send_signal(signal.SIGTERM)
            self.holder.wait(timeout=10)
        if self.holder.stderr is not None:
            self.holder.stderr.close()
        assert not pid_is_running(self.holder.pid)


def udp_listeners(port: int, namespace: NetworkNamespace | None = None) -> list[str]:
    """Return the ``ss -ulpn`` lines for UDP sockets bound to ``port``, in ``namespace`` or this process's own."""
    argv = ["ss", "-H", "-u", "-l", "-p", "-n", f"sport = :{port}"]
    if namespace is not None:
        argv = namespace.command(argv)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True)
    return [line for line in result.stdout.splitlines() if line.strip()]


class NamespacedChain(Chain):
    """A Chain whose commands and daemons all run inside ``namespace``, with mDNS on.

    Its swtpm must run in the namespace too, because the namespace's
    127.0.0.1 is not the host's.
    """

    def __init__(self, namespace: NetworkNamespace, **kwargs) -> None:
        super().__init__(mdns=True, **kwargs)
        self.namespace = namespace

    def tpmsigner(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self._run_inside([*SIGNER_COMMAND, "--home", str(self.signer_home), *args], check, timeout)

    def tpmsigner_agent(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run_inside([*AGENT_COMMAND, "--home", str(self.agent_home), *args], check, 30.0)

    def _run_inside(self, argv: list[str], check: bool, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.namespace.command(argv),
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _spawn(
        self, name: str, argv: list[str], controlling_tty: int | None = None, ignore_hangup: bool = False
    ) -> ManagedProcess:
        # nsenter execs the program after joining, so the pid is the program's.
        return super()._spawn(name, self.namespace.command(argv), controlling_tty, ignore_hangup)
