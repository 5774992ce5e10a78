"""The whole chain under load: parallel logins, listings beside a slow approval, many signatures.

The count of signatures is TPMSIGNER_LOAD_REQUESTS, by default 1,000.  Set
TPMSIGNER_LOAD_REQUESTS=10000 for the full run, which takes 2 to 4 minutes
on 2 cores; docs/benchmarks.md records its results.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.agent_client import (
    SSH_AGENT_IDENTITIES_ANSWER,
    SSH_AGENTC_REQUEST_IDENTITIES,
    AsyncAgentConnection,
    ecdsa_signature_verifies,
    key_blob_of,
    signature_of_response,
)
from tests.support.chain import Chain
from tests.support.processes import wait_until
from tests.test_agent_input import RawAgentClient, assert_identities_answer, request_identities
from tpmsigner.audit import AuditLog

PIN = "4711-load"
PARALLEL_LOGINS = 8
IDLE_CONNECTIONS = 50
SLOW_APPROVAL_SECONDS = 15.0
# A listing must not wait for the slow approval.  The bound is loose, far
# below SLOW_APPROVAL_SECONDS but far above the tens of milliseconds that a
# listing takes, so a busy machine does not make the test fail.
LISTING_BOUND_SECONDS = 5.0
MIN_LISTINGS = 10
DEFAULT_LOAD_REQUESTS = 1000
CONCURRENT_CLIENTS = 16
# RSS is sampled after this share of the requests, once caches and pools
# have reached their working size, and again at the end.
WARM_UP_SHARE = 0.2
# Growth of a daemon's RSS between the two samples that still counts as
# flat: allocator noise, not a leak, which would grow with every request.
RSS_GROWTH_ALLOWED_KIB = 8 * 1024
# The level of each log line of serve, the agent and the embedded signer,
# which all write "DATE TIME LEVEL LOGGER: MESSAGE" (tpmsigner.logsetup).
LOG_LEVEL = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ", re.MULTILINE)


def start_login(chain: Chain, sshd, text: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        sshd.ssh_command(chain.agent_socket, f"echo {text}"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_logins_and_listings_beside_slow_approval(chain: Chain, sshd_factory) -> None:
    public_line = chain.keygen("load", PIN)
    chain.pair()
    signer = chain.start_signer(approval_timeout=60)
    agent = chain.start_agent()
    sshd = sshd_factory(authorized_keys=[public_line])
    idle = [RawAgentClient(chain.agent_socket) for _ in range(IDLE_CONNECTIONS)]
    logins: list[subprocess.Popen[str]] = []
    try:
        chain.delay_next_approval(SLOW_APPROVAL_SECONDS)
        slow = start_login(chain, sshd, "slow-login")
        logins.append(slow)
        # The approver has taken the delay: the slow approval is pending.
        wait_until(
            lambda: len(chain.approver_requests()) == 1 and not (chain.approver_dir / "delay-once").exists(),
            30,
            "the slow approval to start",
        )

        parallel = [start_login(chain, sshd, f"login-{number}") for number in range(PARALLEL_LOGINS)]
        logins += parallel
        listings: list[tuple[float, subprocess.CompletedProcess[str]]] = []
        while len(listings) < MIN_LISTINGS or any(login.poll() is None for login in parallel):
            started = time.monotonic()
            listed = chain.ssh_add("-l")
            listings.append((time.monotonic() - started, listed))
        slow_pending_after_listings = slow.poll() is None

        outputs = [login.communicate(timeout=60) for login in parallel]
        slow_output = slow.communicate(timeout=60)
        for client in idle:
            client.send_message(request_identities())
            assert_identities_answer(client.read_reply())
    finally:
        for client in idle:
            client.close()
        for login in logins:
            if login.poll() is None:
                login.kill()
                login.wait(timeout=10)

    slowest = max(seconds for seconds, _ in listings)
    print(f"{len(listings)} listings beside the slow approval, the slowest in {slowest * 1000:.0f} ms")
    for login, (stdout, stderr) in zip(parallel, outputs):
        assert login.returncode == 0, stderr
        assert stdout.startswith("login-")
    assert sorted(stdout.strip() for stdout, _ in outputs) == sorted(f"login-{n}" for n in range(PARALLEL_LOGINS))
    assert slow.returncode == 0, slow_output[1]
    assert slow_output[0].strip() == "slow-login"
    assert slow_pending_after_listings
    for seconds, listed in listings:
        assert listed.returncode == 0, listed.stderr
        assert "load (ECDSA)" in listed.stdout
        assert seconds < LISTING_BOUND_SECONDS
    assert len(chain.approver_requests()) == PARALLEL_LOGINS + 1
    for managed in (signer, agent):
        log = managed.log_text()
        levels = set(LOG_LEVEL.findall(log))
        assert "INFO" in levels, f"{managed.name}: no log line in the expected format"
        assert not levels & {"ERROR", "CRITICAL"}, log
        assert "Traceback" not in log


def load_request_count() -> int:
    value = os.environ.get("TPMSIGNER_LOAD_REQUESTS", str(DEFAULT_LOAD_REQUESTS))
    if not value.isdigit() or int(value) < CONCURRENT_CLIENTS:
        raise ValueError(f"TPMSIGNER_LOAD_REQUESTS must be a whole number of at least {CONCURRENT_CLIENTS}, not {value!r}")
    return int(value)


def rss_kib(pid: int) -> int:
    """Return the resident set size of a process from /proc/PID/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no VmRSS line")


async def sign_sequence(socket_path: Path, key_blob: bytes, numbers: range) -> list[tuple[bytes, bytes]]:
    """Sign one distinct message per number on one connection; return (data, signature) pairs."""
    connection = await AsyncAgentConnection.open(socket_path)
    results = []
    try:
        for number in numbers:
            data = f"load request {number}".encode()
            reply = await connection.sign(key_blob, data)
            results.append((data, signature_of_response(reply)))

        # A listing right after the last signature must get the listing's
        # own reply, so no second reply to a sign request was queued.
        final = await connection.request(bytes([SSH_AGENTC_REQUEST_IDENTITIES]))
        assert final.message_type == SSH_AGENT_IDENTITIES_ANSWER
    finally:
        await connection.close()
    return results


async def sign_concurrently(socket_path: Path, key_blob: bytes, numbers: range) -> list[tuple[bytes, bytes]]:
    """Spread ``numbers`` over CONCURRENT_CLIENTS connections that sign at the same time."""
    shares = [numbers[index::CONCURRENT_CLIENTS] for index in range(CONCURRENT_CLIENTS)]
    results = await asyncio.gather(*(sign_sequence(socket_path, key_blob, share) for share in shares))
    return [pair for share in results for pair in share]


@pytest.mark.timeout(900)
def test_many_signatures_through_whole_chain(chain: Chain) -> None:
    total = load_request_count()
    public_line = chain.keygen("load", PIN)
    chain.pair()
    signer = chain.start_embedded_signer(PIN)
    agent = chain.start_agent()
    key_blob = key_blob_of(public_line)
    warm_up = max(CONCURRENT_CLIENTS, int(total * WARM_UP_SHARE))

    started = time.monotonic()
    results = asyncio.run(sign_concurrently(chain.agent_socket, key_blob, range(warm_up)))
    rss_after_warm_up = {"signer": rss_kib(signer.process.pid), "agent": rss_kib(agent.process.pid)}
    results += asyncio.run(sign_concurrently(chain.agent_socket, key_blob, range(warm_up, total)))
    elapsed = time.monotonic() - started
    rss_at_end = {"signer": rss_kib(signer.process.pid), "agent": rss_kib(agent.process.pid)}
    print(
        f"{total} signatures from {CONCURRENT_CLIENTS} clients in {elapsed:.1f} s "
        f"({elapsed / total * 1000:.1f} ms each); RSS after warm-up {rss_after_warm_up} KiB, at the end {rss_at_end} KiB"
    )

    assert len(results) == total
    assert len({data for data, _ in results}) == total
    for data, signature in results:
        assert ecdsa_signature_verifies(public_line, data, signature), data

    signer_audit, agent_audit = AuditLog(chain.signer_audit_log), AuditLog(chain.agent_audit_log)
    assert signer_audit.verify().ok
    assert agent_audit.verify().ok
    signer_records, agent_records = signer_audit.records(), agent_audit.records()
    assert len(signer_records) == total
    assert {record["outcome"] for record in signer_records} == {"approved"}
    assert len({record["request_id"] for record in signer_records}) == total
    assert len(agent_records) == total
    assert {record["outcome"] for record in agent_records} == {"approved"}

    for name in ("signer", "agent"):
        growth = rss_at_end[name] - rss_after_warm_up[name]
        assert growth <= RSS_GROWTH_ALLOWED_KIB, f"{name} RSS grew by {growth} KiB over {total - warm_up} requests"

    for managed in (signer, agent):
        log = managed.log_text()
        levels = set(LOG_LEVEL.findall(log))
        assert "INFO" in levels, f"{managed.name}: no log line in the expected format"
        assert levels <= {"DEBUG", "INFO"}, log
        assert "Traceback" not in log
