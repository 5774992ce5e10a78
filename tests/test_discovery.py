"""Discovery over mDNS (zeroconf): advertising, browsing, mdns-pinned signers, pairing found by mDNS.

Every test that starts zeroconf runs its programs, and the swtpm they use,
inside a network namespace of its own (tests/support/netns.py), so no
multicast reaches the host's interfaces.  The tests check that no process
in the test's own namespace binds the mDNS port meanwhile.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.discovery import format_host_port
from tpmsigner.discovery import parse_txt, plan_advertisement, txt_properties, zeroconf_options
from tpmsigner.protocol.channel import parse_public_key, public_key_fingerprint
from tests.support.chain import AGENT_COMMAND, SIGNER_COMMAND
from tests.support.ports import LOCALHOST, free_port
from tests.support.netns import NamespacedChain, NetworkNamespace, udp_listeners
from tests.support.processes import pid_is_running, wait_until
from tests.support.swtpm import START_SCRIPT, STOP_SCRIPT
from tests.support.terminal import TerminalProcess

PIN = "1357-discovery"
MDNS_PORT = 5353


@pytest.fixture
def namespace() -> Iterator[NetworkNamespace]:
    created = NetworkNamespace()
    yield created
    created.close()


@pytest.fixture
def netns_chain(tmp_path: Path, namespace: NetworkNamespace, request: pytest.FixtureRequest) -> Iterator[NamespacedChain]:
    """A chain whose swtpm, signer and agent all run inside ``namespace``."""
    state_dir = tmp_path / "swtpm"
    state_dir.mkdir()
    started = namespace.run([str(START_SCRIPT), str(state_dir)], check=True)
    swtpm_pid = int((state_dir / "swtpm.pid").read_text())
    socket_dir = Path(tempfile.mkdtemp(prefix="tpms-", dir="/tmp"))
    chain = NamespacedChain(
        namespace, workdir=tmp_path / "chain", socket_dir=socket_dir, tcti=started.stdout.strip()
    )
    yield chain

    failed = getattr(request.node, "report_call", None) is not None and request.node.report_call.failed
    if failed:
        print(chain.logs())
    leaked = chain.stop()
    namespace.run([str(STOP_SCRIPT), str(state_dir)], check=True)
    shutil.rmtree(socket_dir, ignore_errors=True)
    assert not leaked, f"{leaked} still running after SIGTERM; killed"
    assert not pid_is_running(swtpm_pid), f"swtpm pid {swtpm_pid} still runs after swtpm/stop"


# Long enough for a loaded machine to reply to mDNS queries.  A 2 s browse
# missed the signer now and then while other tests kept both cores busy.
BROWSE_SECONDS = "5"


def _discover(chain: NamespacedChain, *extra: str) -> list[dict]:
    result = chain.tpmsigner_agent("discover", "--json", "--timeout", BROWSE_SECONDS, *extra)
    return json.loads(result.stdout)


def _pair_terminal(chain: NamespacedChain, argv: list[str]) -> TerminalProcess:
    return TerminalProcess(chain.namespace.command(argv), chain.environment())


# ---- units without the network -----------------------------------------------


def test_txt_round_trip() -> None:
    properties = {key.encode(): value.encode() for key, value in txt_properties("SHA256:abc").items()}
    record = parse_txt(properties)
    assert record.fingerprint == "SHA256:abc"
    assert record.version == "1"


def test_txt_missing_or_invalid_fields() -> None:
    record = parse_txt({b"fp": None, b"v": b"\xff"})
    assert record.fingerprint is None
    assert record.version is None


def test_host_port_of_scoped_link_local() -> None:
    assert format_host_port("fe80::1%2", 7810) == "[fe80::1%2]:7810"
    assert format_host_port("192.0.2.7", 7810) == "192.0.2.7:7810"


def test_advertisement_follows_specific_listen_address() -> None:
    addresses, interfaces = plan_advertisement("127.0.0.1", [])
    assert addresses == ["127.0.0.1"]
    assert interfaces == ["127.0.0.1"]


def test_interface_option_overrides_listen_interface() -> None:
    addresses, interfaces = plan_advertisement("0.0.0.0", ["192.0.2.7", "fe80::1"])
    assert addresses == ["192.0.2.7"]
    assert interfaces == ["192.0.2.7", "fe80::1"]
    assert zeroconf_options(interfaces)["interfaces"] == ["192.0.2.7", "fe80::1"]


# ---- inside a network namespace ---------------------------------------------------


def test_serve_advertises_fingerprint(netns_chain: NamespacedChain) -> None:
    chain = netns_chain
    chain.keygen("work", PIN)
    signer_key = chain.tpmsigner("id").stdout.strip()
    fingerprint = public_key_fingerprint(parse_public_key(signer_key))
    signer = chain.start_signer()
    wait_until(lambda: "advertising _tpmsigner._tcp.local." in signer.log_text(), 10, "the signer to advertise")

    services = _discover(chain)

    assert len(services) == 1
    assert services[0]["fingerprint"] == fingerprint
    assert services[0]["version"] == "1"
    assert services[0]["port"] == chain.signer_port
    assert LOCALHOST in services[0]["addresses"]
    assert services[0]["paired"] is False

    chain.tpmsigner_agent("trust", "home", f"{LOCALHOST}:{chain.signer_port}", signer_key)
    services = _discover(chain)
    assert services[0]["paired"] is True
    assert services[0]["pinned_as"] == "home"
    listing = chain.tpmsigner_agent("discover", "--timeout", BROWSE_SECONDS).stdout
    assert "paired as 'home'" in listing

    # Multicast stays inside the namespace.
    assert udp_listeners(MDNS_PORT, chain.namespace)
    assert udp_listeners(MDNS_PORT) == []


def test_no_mdns_advertises_nothing(netns_chain: NamespacedChain) -> None:
    chain = netns_chain
    chain.keygen("work", PIN)
    signer = chain.start_signer("--no-mdns")

    assert _discover(chain) == []
    assert "advertising" not in signer.log_text()
    assert udp_listeners(MDNS_PORT, chain.namespace) == []


def test_agent_finds_mdns_signer_by_key(netns_chain: NamespacedChain) -> None:
    chain = netns_chain
    public_line = chain.keygen("work", PIN)
    agent_key = chain.tpmsigner_agent("id").stdout.strip()
    chain.tpmsigner("allow", "laptop", agent_key)
    chain.tpmsigner_agent("trust", "home", "-", chain.tpmsigner("id").stdout.strip())
    signers = json.loads((chain.agent_home / "signers.json").read_text())["signers"]
    assert signers["home"]["address"] == "mdns"

    chain.start_signer()
    chain.start_agent()
    listed = chain.ssh_add("-L")

    assert listed.returncode == 0, listed.stderr
    assert public_line.split()[1] in listed.stdout
    assert udp_listeners(MDNS_PORT) == []


@pytest.mark.parametrize("interface", ["127.0.0.1", "lo"])
def test_agent_interface_option_finds_signer(netns_chain: NamespacedChain, interface: str) -> None:
    chain = netns_chain
    public_line = chain.keygen("work", PIN)
    chain.tpmsigner("allow", "laptop", chain.tpmsigner_agent("id").stdout.strip())
    chain.tpmsigner_agent("trust", "home", "mdns", chain.tpmsigner("id").stdout.strip())

    chain.start_signer()
    chain.start_agent("--interface", interface)
    listed = chain.ssh_add("-L")

    assert listed.returncode == 0, listed.stderr
    assert public_line.split()[1] in listed.stdout
    assert udp_listeners(MDNS_PORT) == []


@pytest.mark.parametrize(
    ("interface", "message"),
    [
        ("192.0.2.1", "invalid --interface 192.0.2.1: no interface of this host has that address"),
        ("no-such-if0", "invalid --interface 'no-such-if0': not an IP address or an interface name (lo)"),
    ],
)
def test_agent_interface_option_checked_at_start(netns_chain: NamespacedChain, interface: str, message: str) -> None:
    chain = netns_chain
    chain.tpmsigner_agent("trust", "home", "mdns", chain.tpmsigner("id").stdout.strip())

    result = chain.tpmsigner_agent(
        "run", "--foreground", "--socket", str(chain.agent_socket), "--interface", interface, check=False
    )

    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not chain.agent_socket.exists()


def test_discover_accepts_interface_name(netns_chain: NamespacedChain) -> None:
    chain = netns_chain
    signer = chain.start_signer()
    fingerprint = public_key_fingerprint(parse_public_key(chain.tpmsigner("id").stdout.strip()))
    wait_until(lambda: "advertising _tpmsigner._tcp.local." in signer.log_text(), 10, "the signer to advertise")

    services = _discover(chain, "--interface", "lo")

    assert [service["fingerprint"] for service in services] == [fingerprint]


def test_mdns_signer_absent_fails_clearly(netns_chain: NamespacedChain) -> None:
    chain = netns_chain
    chain.keygen("work", PIN)
    chain.tpmsigner_agent("trust", "home", "mdns", chain.tpmsigner("id").stdout.strip())
    agent = chain.start_agent()

    listed = chain.ssh_add("-L")

    assert listed.returncode != 0
    assert "was not found over mDNS" in agent.log_text()


def test_pair_found_over_mdns(netns_chain: NamespacedChain) -> None:
    chain = netns_chain
    public_line = chain.keygen("work", PIN)
    pairing_port = free_port()
    signer = _pair_terminal(
        chain,
        [*SIGNER_COMMAND, "--home", str(chain.signer_home), "pair", "--listen", f"{LOCALHOST}:{pairing_port}",
         "--timeout", "30"],
    )
    agent = None
    try:
        signer.expect("Waiting up to")
        agent = _pair_terminal(
            chain, [*AGENT_COMMAND, "--home", str(chain.agent_home), "pair", "--device-name", "laptop"]
        )
        signer_code = signer.expect(r"Pairing code: (\d{6})").group(1)
        agent_code = agent.expect(r"Pairing code: (\d{6})").group(1)
        assert signer_code == agent_code
        signer.expect(r"\[y/N\]")
        agent.expect(r"\[y/N\]")
        assert udp_listeners(MDNS_PORT) == []
        signer.send_line("y")
        agent.send_line("y")
        assert signer.wait() == 0, signer.output
        assert agent.wait() == 0, agent.output
    finally:
        signer.close()
        if agent is not None:
            agent.close()

    assert f"at {LOCALHOST}:{pairing_port}" in agent.output
    signers = json.loads((chain.agent_home / "signers.json").read_text())["signers"]
    assert len(signers) == 1
    assert next(iter(signers.values()))["address"] == "mdns"

    # The pairing window's advertisement is gone, and the paired signer is found by its key.
    chain.start_signer()
    chain.start_agent()
    listed = chain.ssh_add("-L")
    assert listed.returncode == 0, listed.stderr
    assert public_line.split()[1] in listed.stdout
    assert [service["paired"] for service in _discover(chain)] == [True]


def test_pair_without_window_fails(netns_chain: NamespacedChain) -> None:
    chain = netns_chain
    agent = _pair_terminal(chain, [*AGENT_COMMAND, "--home", str(chain.agent_home), "pair", "--timeout", "1"])
    try:
        assert agent.wait() == 1, agent.output
    finally:
        agent.close()
    assert "no pairing window found over mDNS within 1 s" in agent.output
    assert not (chain.agent_home / "signers.json").exists()


def test_unusable_interface_warns_in_one_line(namespace: NetworkNamespace, tmp_path: Path) -> None:
    # Debian's loopback has no MULTICAST flag, so zeroconf cannot send on
    # ::1 and logs a warning with a traceback, which only -v should show.
    namespace.run(["ip", "link", "set", "lo", "multicast", "off"], check=True)
    home = tmp_path / "agent-home"
    argv = [*AGENT_COMMAND, "--home", str(home), "discover", "--timeout", "1"]

    quiet = namespace.run(argv)
    verbose = namespace.run([*AGENT_COMMAND, "--home", str(home), "-v", "discover", "--timeout", "1"])

    assert quiet.returncode == 0, quiet.stderr
    assert "WARNING zeroconf: Error with socket" in quiet.stderr
    assert "Traceback" not in quiet.stderr
    assert "Traceback" in verbose.stderr
