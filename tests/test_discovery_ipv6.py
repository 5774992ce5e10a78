"""An agent reaches a signer over an IPv6 link-local address between two hosts.

Two network namespaces model two hosts joined by a veth pair: the signer
host (swtpm and ``tpmsigner serve``) and the agent host
(``tpmsigner-agent run`` and ``ssh-add``).  The veth ends get only their
automatic fe80:: addresses, with no IPv4 or global IPv6 address, so the
only path between the hosts is IPv6 link-local.  The veth pair is created
inside the signer namespace with its peer moved straight into the agent
namespace, so nothing is added to, or multicast on, the root namespace.
Creating the namespaces needs root (CAP_SYS_ADMIN).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.chain import AGENT_COMMAND, SIGNER_COMMAND, Chain, ManagedProcess
from tests.support.netns import NetworkNamespace, udp_listeners
from tests.support.processes import pid_is_running, wait_until
from tests.support.swtpm import START_SCRIPT, STOP_SCRIPT

PIN = "2468-link-local"
MDNS_PORT = 5353
SIGNER_INTERFACE = "veth-signer"
AGENT_INTERFACE = "veth-agent"
# Duplicate address detection keeps a new fe80:: address tentative for
# about a second, so 10 s leaves a wide margin for a busy machine.
ADDRESS_TIMEOUT = 10.0
LINK_LOCAL = re.compile(r"inet6 (fe80::[0-9a-f:]+)/64 scope link(.*)")


def _root_link_names() -> set[str]:
    result = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=10, check=True)
    return {line.split(":")[1].strip().split("@")[0] for line in result.stdout.splitlines()}


@dataclass
class LinkEnd:
    """One host's end of the veth pair: its namespace, interface and fe80:: address."""

    namespace: NetworkNamespace
    interface: str
    address: str = ""

    def ip(self, *args: str) -> str:
        result = self.namespace.run(["ip", *args], timeout=10)
        assert result.returncode == 0, f"ip {' '.join(args)} failed: {result.stderr}"
        return result.stdout

    def index(self) -> int:
        # /sys/class/net shows the namespace that mounted /sys, so ask ip instead.
        return int(self.ip("-o", "link", "show", "dev", self.interface).split(":", 1)[0])

    def bring_up(self) -> None:
        sysctl = self.namespace.run(["sysctl", "-w", f"net.ipv6.conf.{self.interface}.disable_ipv6=0"], timeout=10)
        assert sysctl.returncode == 0, sysctl.stderr
        self.ip("link", "set", self.interface, "multicast", "on", "up")

    def ready_link_local(self) -> str | None:
        """Return the interface's fe80:: address once duplicate address detection has finished."""
        for match in LINK_LOCAL.finditer(self.ip("-6", "addr", "show", "dev", self.interface)):
            if "tentative" not in match.group(2):
                return match.group(1)
        return None


@dataclass
class TwoHosts:
    signer: LinkEnd
    agent: LinkEnd


@pytest.fixture
def two_hosts() -> Iterator[TwoHosts]:
    """Two namespaces joined by a veth pair, each end up with only a link-local address."""
    links_before = _root_link_names()
    signer_namespace = NetworkNamespace()
    agent_namespace = None
    try:
        agent_namespace = NetworkNamespace()
        hosts = TwoHosts(LinkEnd(signer_namespace, SIGNER_INTERFACE), LinkEnd(agent_namespace, AGENT_INTERFACE))
        hosts.signer.ip(
            "link", "add", SIGNER_INTERFACE, "type", "veth",
            "peer", "name", AGENT_INTERFACE, "netns", str(agent_namespace.holder.pid),
        )
        for end in (hosts.signer, hosts.agent):
            end.bring_up()
        for end in (hosts.signer, hosts.agent):
            wait_until(
                lambda: end.ready_link_local() is not None,
                ADDRESS_TIMEOUT,
                f"a non-tentative fe80:: address on {end.interface}",
            )
            end.address = end.ready_link_local() or ""
            assert end.ip("-4", "addr", "show", "dev", end.interface).strip() == ""
            assert end.ip("-6", "addr", "show", "dev", end.interface, "scope", "global").strip() == ""
        yield hosts
    finally:
        # Deleting one end removes both.  Closing the namespaces would remove
        # them too, but only once every process inside them has exited.
        signer_namespace.run(["ip", "link", "del", SIGNER_INTERFACE], timeout=10)
        if agent_namespace is not None:
            agent_namespace.close()
        signer_namespace.close()
    assert _root_link_names() == links_before


class TwoHostChain(Chain):
    """A Chain whose signer side runs in one namespace and whose agent side runs in another."""

    def __init__(self, hosts: TwoHosts, **kwargs) -> None:
        super().__init__(mdns=True, **kwargs)
        self.hosts = hosts

    def tpmsigner(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self._run_in(self.hosts.signer.namespace, [*self._signer_argv(), *args], check, timeout)

    def tpmsigner_agent(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run_in(self.hosts.agent.namespace, [*self._agent_argv(), *args], check, 30.0)

    def ssh_add(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.hosts.agent.namespace.command(["ssh-add", *args]),
            env=self.agent_environment(),
            capture_output=True,
            text=True,
            timeout=60.0,
            stdin=subprocess.DEVNULL,
        )

    def _signer_argv(self) -> list[str]:
        return [*SIGNER_COMMAND, "--home", str(self.signer_home)]

    def _agent_argv(self) -> list[str]:
        return [*AGENT_COMMAND, "--home", str(self.agent_home)]

    def _run_in(
        self, namespace: NetworkNamespace, argv: list[str], check: bool, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            namespace.command(argv),
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
        namespace = self.hosts.signer.namespace if name == "signer" else self.hosts.agent.namespace
        return super()._spawn(name, namespace.command(argv), controlling_tty, ignore_hangup)


@pytest.fixture
def chain(tmp_path: Path, two_hosts: TwoHosts, request: pytest.FixtureRequest) -> Iterator[TwoHostChain]:
    """A chain with swtpm and the signer on the signer host, and the agent on the agent host."""
    state_dir = tmp_path / "swtpm"
    state_dir.mkdir()
    signer_namespace = two_hosts.signer.namespace
    started = signer_namespace.run([str(START_SCRIPT), str(state_dir)], check=True)
    swtpm_pid = int((state_dir / "swtpm.pid").read_text())
    socket_dir = Path(tempfile.mkdtemp(prefix="tpms-", dir="/tmp"))
    test_chain = TwoHostChain(two_hosts, workdir=tmp_path / "chain", socket_dir=socket_dir, tcti=started.stdout.strip())
    yield test_chain

    failed = getattr(request.node, "report_call", None) is not None and request.node.report_call.failed
    if failed:
        print(test_chain.logs())
    leaked = test_chain.stop()
    signer_namespace.run([str(STOP_SCRIPT), str(state_dir)], check=True)
    shutil.rmtree(socket_dir, ignore_errors=True)
    assert not leaked, f"{leaked} still running after SIGTERM; killed"
    assert not pid_is_running(swtpm_pid), f"swtpm pid {swtpm_pid} still runs after swtpm/stop"


def _allow_agent(chain: TwoHostChain) -> str:
    """Allow the agent's key on the signer and return the signer's key."""
    chain.tpmsigner("allow", "laptop", chain.tpmsigner_agent("id").stdout.strip())
    return chain.tpmsigner("id").stdout.strip()


def _start_signer_on_all_addresses(chain: TwoHostChain, *mdns_args: str) -> ManagedProcess:
    # argparse keeps the last --listen, so this one replaces 127.0.0.1:PORT.
    return chain.start_signer("--listen", f"[::]:{chain.signer_port}", *mdns_args)


# ---- found over mDNS -------------------------------------------------------------


def test_mdns_signer_over_link_local(chain: TwoHostChain) -> None:
    hosts = chain.hosts
    public_line = chain.keygen("work", PIN)
    signer_key = _allow_agent(chain)
    chain.tpmsigner_agent("trust", "home", "-", signer_key)
    signer = _start_signer_on_all_addresses(chain, "--interface", SIGNER_INTERFACE)
    wait_until(lambda: "advertising _tpmsigner._tcp.local." in signer.log_text(), 10, "the signer to advertise")
    assert f"at {hosts.signer.address} over mDNS" in signer.log_text()

    services = json.loads(chain.tpmsigner_agent("discover", "--json", "--timeout", "3").stdout)
    assert len(services) == 1
    assert services[0]["pinned_as"] == "home"
    assert services[0]["port"] == chain.signer_port
    # zeroconf sets the scope to the index of the interface that received the response.
    assert services[0]["addresses"] == [f"{hosts.signer.address}%{hosts.agent.index()}"]

    chain.start_agent()
    listed = chain.ssh_add("-L")

    assert listed.returncode == 0, listed.stderr
    assert public_line.split()[1] in listed.stdout
    assert chain.agent is not None
    connected = f"connected to signer 'home' at [{hosts.signer.address}%{hosts.agent.index()}]:{chain.signer_port}"
    assert connected in chain.agent.log_text()
    # Multicast stays inside the two namespaces.
    assert udp_listeners(MDNS_PORT, hosts.signer.namespace)
    assert udp_listeners(MDNS_PORT, hosts.agent.namespace) == []
    assert udp_listeners(MDNS_PORT) == []


# ---- pinned to a fixed link-local address ----------------------------------------


@pytest.mark.parametrize("scope_kind", ["name", "index"])
def test_pinned_scoped_link_local(chain: TwoHostChain, scope_kind: str) -> None:
    hosts = chain.hosts
    public_line = chain.keygen("work", PIN)
    signer_key = _allow_agent(chain)
    scope = hosts.agent.interface if scope_kind == "name" else str(hosts.agent.index())
    address = f"[{hosts.signer.address}%{scope}]:{chain.signer_port}"
    chain.tpmsigner_agent("trust", "home", address, signer_key)
    signers = json.loads((chain.agent_home / "signers.json").read_text())["signers"]
    assert signers["home"]["address"] == address

    _start_signer_on_all_addresses(chain, "--no-mdns")
    chain.start_agent()
    listed = chain.ssh_add("-L")

    assert listed.returncode == 0, listed.stderr
    assert public_line.split()[1] in listed.stdout
    assert chain.agent is not None
    assert f"connected to signer 'home' at {address}" in chain.agent.log_text()
    assert udp_listeners(MDNS_PORT, hosts.signer.namespace) == []


def test_pinned_link_local_without_scope(chain: TwoHostChain) -> None:
    hosts = chain.hosts
    signer_key = _allow_agent(chain)
    address = f"[{hosts.signer.address}]:{chain.signer_port}"

    trusted = chain.tpmsigner_agent("trust", "home", address, signer_key, check=False)

    assert trusted.returncode != 0
    assert "Traceback" not in trusted.stderr
    assert f"invalid address {address!r}" in trusted.stderr
    assert "link-local address needs a scope" in trusted.stderr
    assert not (chain.agent_home / "signers.json").exists()
