"""Pairing by code comparison, and listing and revoking paired devices.

Both pairing commands run on pseudo-terminals and are answered as a person
would.  These tests pass --no-mdns and a fixed address, so nothing here
uses multicast; tests/test_discovery.py covers pairing found over mDNS.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence

import pytest

from tpmsigner.errors import ChannelError
from tpmsigner.pairing import Confirm, Hello, default_name, pairing_code, receive, send
from tpmsigner.protocol import channel
from tpmsigner.signer import admission
from tests.support import wait_until
from tests.support.chain import AGENT_COMMAND, SIGNER_COMMAND, Chain
from tests.support.ports import LOCALHOST, free_port
from tests.support.terminal import TerminalProcess

PIN = "2468-pairing"


class Pairing:
    """``tpmsigner pair`` and ``tpmsigner-agent pair`` of one test, each on its own terminal."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self.port = free_port()
        self.started: list[TerminalProcess] = []

    def start_signer(self, *extra: str, timeout: float = 30.0, prefix: Sequence[str] = ()) -> TerminalProcess:
        argv = [
            *prefix,
            *SIGNER_COMMAND, "--home", str(self.chain.signer_home), "pair",
            "--listen", f"{LOCALHOST}:{self.port}", "--no-mdns", "--timeout", str(timeout), *extra,
        ]
        signer = TerminalProcess(argv, self.chain.environment())
        self.started.append(signer)
        signer.expect("Waiting up to")
        return signer

    def start_agent(self, *extra: str) -> TerminalProcess:
        argv = [
            *AGENT_COMMAND, "--home", str(self.chain.agent_home), "pair", f"{LOCALHOST}:{self.port}",
            "--signer-address", f"{LOCALHOST}:{self.chain.signer_port}", *extra,
        ]
        agent = TerminalProcess(argv, self.chain.environment())
        self.started.append(agent)
        return agent

    def close(self) -> None:
        for process in self.started:
            process.close()


@pytest.fixture
def pairing(chain: Chain) -> Iterator[Pairing]:
    session = Pairing(chain)
    yield session
    session.close()


def _codes(signer: TerminalProcess, agent: TerminalProcess) -> tuple[str, str]:
    signer_code = signer.expect(r"Pairing code: (\d{6})").group(1)
    agent_code = agent.expect(r"Pairing code: (\d{6})").group(1)
    signer.expect(r"Do the codes match\? \[y/N\]")
    agent.expect(r"Do the codes match\? \[y/N\]")
    return signer_code, agent_code


def _devices(chain: Chain) -> list[dict]:
    return json.loads(chain.tpmsigner("devices", "--json").stdout)


def _signers_file(chain: Chain) -> dict:
    path = chain.agent_home / "signers.json"
    return json.loads(path.read_text())["signers"] if path.exists() else {}


def test_pairing_code_formula() -> None:
    handshake_hash = bytes(range(32))
    digest = hashlib.sha256(b"tpmsigner pairing code" + handshake_hash).digest()
    expected = int.from_bytes(digest[:4], "big") % 1_000_000

    code = pairing_code(handshake_hash)

    assert code == f"{expected:06d}"
    assert len(code) == 6


def test_pairing_code_keeps_leading_zeros() -> None:
    # Find a hash whose code is below 100000, so padding matters.
    for counter in range(100_000):
        handshake_hash = counter.to_bytes(32, "big")
        digest = hashlib.sha256(b"tpmsigner pairing code" + handshake_hash).digest()
        if int.from_bytes(digest[:4], "big") % 1_000_000 < 100_000:
            break
    code = pairing_code(handshake_hash)
    assert len(code) == 6
    assert code.startswith("0")


def _handshake_pair(initiator, responder) -> tuple[object, object]:
    """Run an initiator and a responder against each other over a socket pair."""

    async def run() -> tuple[object, object]:
        left, right = socket.socketpair()
        left_reader, left_writer = await asyncio.open_connection(sock=left)
        right_reader, right_writer = await asyncio.open_connection(sock=right)
        results = await asyncio.gather(
            initiator(left_reader, left_writer), responder(right_reader, right_writer), return_exceptions=True
        )
        left_writer.close()
        right_writer.close()
        return results[0], results[1]

    return asyncio.run(run())


def test_pairing_handshakes_share_hash() -> None:
    agent_key = channel.StaticKey.generate()
    signer_key = channel.StaticKey.generate()

    agent_side, signer_side = _handshake_pair(
        lambda reader, writer: channel.initiate_pairing(reader, writer, agent_key, timeout=5.0),
        lambda reader, writer: channel.respond_pairing(reader, writer, signer_key, timeout=5.0),
    )

    assert isinstance(agent_side, channel.NoiseChannel)
    assert isinstance(signer_side, channel.NoiseChannel)
    assert agent_side.remote_static == signer_key.public
    assert signer_side.remote_static == agent_key.public
    assert agent_side.handshake_hash == signer_side.handshake_hash


def test_pairing_handshake_fails_against_session() -> None:
    agent_key = channel.StaticKey.generate()
    signer_key = channel.StaticKey.generate()

    # A pairing initiator against a normal signer that would even trust it.
    agent_side, signer_side = _handshake_pair(
        lambda reader, writer: channel.initiate_pairing(reader, writer, agent_key, timeout=5.0),
        lambda reader, writer: channel.respond(reader, writer, signer_key, lambda key: True, timeout=5.0),
    )
    assert isinstance(agent_side, ChannelError)
    assert isinstance(signer_side, ChannelError)

    # A normal agent that pinned the right key, against a pairing responder.
    agent_side, signer_side = _handshake_pair(
        lambda reader, writer: channel.initiate(reader, writer, agent_key, signer_key.public, timeout=5.0),
        lambda reader, writer: channel.respond_pairing(reader, writer, signer_key, timeout=5.0),
    )
    assert isinstance(agent_side, ChannelError)
    assert isinstance(signer_side, ChannelError)


def test_pair_both_confirm_then_login_list(chain: Chain, pairing: Pairing) -> None:
    public_line = chain.keygen("work", PIN)
    signer = pairing.start_signer()
    agent = pairing.start_agent("--device-name", "laptop", "--name", "home")

    signer_code, agent_code = _codes(signer, agent)
    assert signer_code == agent_code
    signer.send_line("y")
    agent.send_line("y")

    assert signer.wait() == 0, signer.output
    assert agent.wait() == 0, agent.output
    assert "Paired device 'laptop'" in signer.output
    assert "Pinned signer 'home'" in agent.output

    devices = _devices(chain)
    assert [device["name"] for device in devices] == ["laptop"]
    assert devices[0]["key"] == chain.tpmsigner_agent("id").stdout.strip()
    assert devices[0]["paired"]
    signers = _signers_file(chain)
    assert signers["home"]["key"] == chain.tpmsigner("id").stdout.strip()
    assert signers["home"]["address"] == f"{LOCALHOST}:{chain.signer_port}"

    # The pinned keys open a real session.
    chain.start_signer()
    chain.start_agent()
    listed = chain.ssh_add("-L")
    assert listed.returncode == 0, listed.stderr
    assert public_line.split()[1] in listed.stdout


def test_pair_signer_name_overrides_proposal(chain: Chain, pairing: Pairing) -> None:
    signer = pairing.start_signer("--name", "chosen-on-signer")
    agent = pairing.start_agent("--device-name", "proposed-by-agent")
    _codes(signer, agent)
    signer.send_line("y")
    agent.send_line("y")
    assert signer.wait() == 0, signer.output
    assert agent.wait() == 0, agent.output

    assert [device["name"] for device in _devices(chain)] == ["chosen-on-signer"]


def test_pair_agent_proposes_hostname(chain: Chain, pairing: Pairing) -> None:
    signer = pairing.start_signer()
    agent = pairing.start_agent()
    _codes(signer, agent)
    signer.send_line("y")
    agent.send_line("y")
    assert signer.wait() == 0, signer.output
    assert agent.wait() == 0, agent.output

    hostname = socket.gethostname().split(".")[0]
    assert [device["name"] for device in _devices(chain)] == [hostname]
    assert list(_signers_file(chain)) == [hostname]


@pytest.mark.parametrize("refusing_side", ["signer", "agent"])
def test_pair_refusal_pins_nothing(chain: Chain, pairing: Pairing, refusing_side: str) -> None:
    signer = pairing.start_signer()
    agent = pairing.start_agent()
    _codes(signer, agent)
    refusing, other = (signer, agent) if refusing_side == "signer" else (agent, signer)

    refusing.send_line("n")

    # The other side's open question ends without an answer.
    assert refusing.wait() == 1, refusing.output
    assert other.wait() == 1, other.output
    assert "pairing rejected here" in refusing.output
    assert "the other device rejected the pairing" in other.output
    assert _devices(chain) == []
    assert _signers_file(chain) == {}


def test_pair_refusal_after_other_confirmed(chain: Chain, pairing: Pairing) -> None:
    signer = pairing.start_signer()
    agent = pairing.start_agent()
    _codes(signer, agent)

    agent.send_line("y")
    time.sleep(0.5)
    signer.send_line("n")

    assert signer.wait() == 1, signer.output
    assert agent.wait() == 1, agent.output
    assert _devices(chain) == []
    assert _signers_file(chain) == {}


def test_pair_window_times_out(chain: Chain, pairing: Pairing) -> None:
    signer = pairing.start_signer(timeout=1.0)

    assert signer.wait(timeout=15) == 1, signer.output
    assert "no agent paired within 1 s" in signer.output
    with pytest.raises(OSError):
        socket.create_connection((LOCALHOST, pairing.port), timeout=2).close()


def test_pair_window_is_single_use(chain: Chain, pairing: Pairing) -> None:
    signer = pairing.start_signer()
    agent = pairing.start_agent("--device-name", "first")
    _codes(signer, agent)
    signer.send_line("y")
    agent.send_line("y")
    assert signer.wait() == 0, signer.output
    assert agent.wait() == 0, agent.output

    second = pairing.start_agent("--device-name", "second")
    assert second.wait() == 1, second.output
    assert "cannot connect to the pairing window" in second.output
    assert [device["name"] for device in _devices(chain)] == ["first"]


def test_pair_ignores_failed_handshake(chain: Chain, pairing: Pairing) -> None:
    signer = pairing.start_signer()
    with socket.create_connection((LOCALHOST, pairing.port), timeout=5) as stray:
        stray.sendall(b"\x00\x05hello")
    signer.expect("failed during the handshake")

    agent = pairing.start_agent()
    _codes(signer, agent)
    signer.send_line("y")
    agent.send_line("y")
    assert signer.wait() == 0, signer.output
    assert agent.wait() == 0, agent.output


def test_pair_name_conflict_refused_early(chain: Chain, pairing: Pairing) -> None:
    other_key = channel.format_public_key(b"\x07" * 32)
    chain.tpmsigner("allow", "laptop", other_key)
    signer = pairing.start_signer()
    agent = pairing.start_agent("--device-name", "laptop")

    assert signer.wait() == 1, signer.output
    assert agent.wait() == 1, agent.output
    assert "Pairing code" not in signer.output
    assert "already allowed" in signer.output
    assert "choose a device name with --name" in signer.output
    assert "the other device ended the pairing" in agent.output
    assert [device["key"] for device in _devices(chain)] == [other_key]
    assert _signers_file(chain) == {}


@pytest.mark.parametrize("command", [SIGNER_COMMAND, AGENT_COMMAND])
def test_pair_needs_terminal(chain: Chain, command: list[str]) -> None:
    home = chain.signer_home if command is SIGNER_COMMAND else chain.agent_home
    argv = [*command, "--home", str(home), "pair"]
    if command is AGENT_COMMAND:
        argv.append(f"{LOCALHOST}:{free_port()}")
    else:
        argv += ["--listen", f"{LOCALHOST}:{free_port()}", "--no-mdns"]

    result = subprocess.run(
        argv, env=chain.environment(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30
    )

    assert result.returncode == 1
    assert "pairing needs a terminal" in result.stderr


def test_pair_has_no_yes_option(chain: Chain) -> None:
    result = chain.tpmsigner("pair", "--yes", check=False)
    assert result.returncode == 2
    assert "unrecognized arguments: --yes" in result.stderr


def test_devices_shows_last_seen(chain: Chain) -> None:
    chain.keygen("work", PIN)
    chain.pair("laptop")
    chain.start_signer()
    chain.start_agent()
    assert chain.ssh_add("-L").returncode == 0

    devices = _devices(chain)
    assert devices[0]["name"] == "laptop"
    assert devices[0]["paired"]
    assert devices[0]["last_seen"]
    assert devices[0]["last_address"].startswith(f"{LOCALHOST}:")
    table = chain.tpmsigner("devices").stdout
    assert "laptop" in table
    assert devices[0]["fingerprint"] in table


def test_devices_reads_version_1_file(chain: Chain) -> None:
    key = channel.format_public_key(b"\x05" * 32)
    chain.signer_home.mkdir(parents=True)
    (chain.signer_home / "devices.json").write_text(json.dumps({"version": 1, "devices": {"old": key}}))

    devices = _devices(chain)

    assert [(device["name"], device["key"], device["paired"]) for device in devices] == [("old", key, None)]
    chain.tpmsigner("revoke", "old")
    assert json.loads((chain.signer_home / "devices.json").read_text()) == {"version": 2, "devices": {}}


def test_revoke_unknown_device_fails(chain: Chain) -> None:
    chain.tpmsigner("allow", "laptop", channel.format_public_key(b"\x06" * 32))

    result = chain.tpmsigner("revoke", "phone", check=False)

    assert result.returncode == 1
    assert "no device named 'phone'" in result.stderr
    assert "laptop" in result.stderr


def test_revoke_closes_idle_connection(chain: Chain) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair("laptop")
    signer = chain.start_signer()
    agent = chain.start_agent()
    listed = chain.ssh_add("-L")
    assert public_line.split()[1] in listed.stdout
    assert "device 'laptop' connected" in signer.log_text()

    chain.tpmsigner("revoke", "laptop")

    # The signer reads devices.json again every second, with no request to
    # prompt it.  The bounds leave room for a busy machine and still fail a
    # signer that keeps the connection open.
    wait_until(lambda: "no longer allowed; closing its connection" in signer.log_text(), 10, "the signer to close")
    wait_until(lambda: "connection to signer 'test-signer' closed" in agent.log_text(), 10, "the agent to notice")
    assert _devices(chain) == []

    # A new connection from the revoked device is rejected in the handshake.
    after = chain.ssh_add("-L")
    assert public_line.split()[1] not in after.stdout
    wait_until(lambda: "rejected" in signer.log_text(), 5, "the signer to reject the revoked key")


# A refusal whose reason would clear the screen, set the window title and
# print a line that looks like a successful pairing.
HOSTILE_REASON = "\x1b[2J\x1b]0;forged\x07\rPaired device 'laptop'.\x9b1A"
ESCAPED_REASON = "\\x1b[2J\\x1b]0;forged\\x07\\x0dPaired device 'laptop'.\\x9b1A"


def test_pair_escapes_refusal_from_unpaired_peer(chain: Chain, pairing: Pairing) -> None:
    signer = pairing.start_signer()

    async def refuse_with_escapes() -> None:
        reader, writer = await asyncio.open_connection(LOCALHOST, pairing.port)
        secure = await channel.initiate_pairing(reader, writer, channel.StaticKey.generate())
        await send(secure, Confirm(False, HOSTILE_REASON))
        await secure.close()

    asyncio.run(asyncio.wait_for(refuse_with_escapes(), 20))

    assert signer.wait() == 1, signer.output
    assert f"the other device ended the pairing: {ESCAPED_REASON}" in signer.output
    assert "\x1b" not in signer.output
    assert "\x07" not in signer.output
    assert "\x9b" not in signer.output
    assert _devices(chain) == []


def test_agent_pair_escapes_refusal_from_window(chain: Chain, pairing: Pairing) -> None:
    async def hostile_window() -> None:
        async def pair(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            secure = await channel.respond_pairing(reader, writer, channel.StaticKey.generate())
            await receive(secure)
            await send(secure, Hello("signer"))
            await send(secure, Confirm(False, HOSTILE_REASON))
            await secure.close()
            paired.set()

        paired = asyncio.Event()
        server = await asyncio.start_server(pair, LOCALHOST, pairing.port)
        async with server:
            await asyncio.to_thread(pairing.start_agent)
            await asyncio.wait_for(paired.wait(), 20)

    asyncio.run(hostile_window())
    agent = pairing.started[-1]

    assert agent.wait() == 1, agent.output
    assert f"the other device rejected the pairing ({ESCAPED_REASON})" in agent.output
    assert "\x1b" not in agent.output
    assert "\x07" not in agent.output
    assert "\x9b" not in agent.output
    assert _signers_file(chain) == {}


# Open files of the pairing window in the flood test: the common default
# soft limit of 1,024 scaled down, so that the test fills it with 148 connections.
FLOOD_FILE_LIMIT = 128


def test_pair_window_survives_silent_connection_flood(chain: Chain, pairing: Pairing) -> None:
    signer = pairing.start_signer(prefix=["prlimit", f"--nofile={FLOOD_FILE_LIMIT}", "--"])

    async def flood_then_pair() -> None:
        silent = []
        try:
            for _ in range(FLOOD_FILE_LIMIT + 20):
                silent.append(await asyncio.open_connection(LOCALHOST, pairing.port, local_addr=("127.0.0.2", 0)))
            agent = await asyncio.to_thread(pairing.start_agent)
            await asyncio.to_thread(agent.expect, r"Do the codes match\? \[y/N\]")
        finally:
            for _, writer in silent:
                writer.close()

    asyncio.run(asyncio.wait_for(flood_then_pair(), 60))
    agent = pairing.started[-1]
    signer.expect(r"Do the codes match\? \[y/N\]")
    signer.send_line("y")
    agent.send_line("y")

    assert signer.wait() == 0, signer.output
    assert agent.wait() == 0, agent.output
    limit = admission.MAX_HANDSHAKES_PER_ADDRESS
    assert f"closed before the handshake: {limit} handshakes from 127.0.0.2 are already in progress" in signer.output
    assert [device["name"] for device in _devices(chain)] == [default_name()]
