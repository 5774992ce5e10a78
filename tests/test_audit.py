"""The agent's and the signer's audit logs, against real logins."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import asyncssh
import pytest

from tpmsigner.audit import AuditLog

from tests.support.chain import Chain

PIN = "4711-audit-log"


def start(chain: Chain) -> str:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    chain.start_agent()
    return public_line


def login(chain: Chain, sshd) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sshd.ssh_command(chain.agent_socket, "true"), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_agent_audit_records_each_outcome(chain: Chain, sshd_factory) -> None:
    public_line = start(chain)
    sshd = sshd_factory(authorized_keys=[public_line])

    assert login(chain, sshd).returncode == 0
    chain.set_decision("deny")
    assert login(chain, sshd).returncode == 255
    chain.set_decision("approve")
    chain.set_approver_pin("wrong-pin-value")
    assert login(chain, sshd).returncode == 255

    entries = records(chain.agent_audit_log)
    assert [entry["outcome"] for entry in entries] == ["approved", "denied", "wrong_pin"]
    first = entries[0]
    assert first["purpose"] == "ssh-login"
    assert first["destination"]["user"] == sshd.user
    assert first["destination"]["host"] == "127.0.0.1"
    assert first["destination"]["verified"] is True
    assert first["destination"]["forwarded"] is False
    assert first["destination"]["host_key_fingerprint"].startswith("SHA256:")
    assert first["executable"].endswith("/ssh")
    assert f"-p {sshd.port}" in first["command_line"]
    assert first["uid"] == os.getuid()
    assert first["signer"] == "test-signer"
    assert isinstance(first["latency_ms"], int)
    assert os.stat(chain.agent_audit_log).st_mode & 0o777 == 0o600
    text = chain.agent_audit_log.read_text()
    assert PIN not in text
    assert "wrong-pin-value" not in text


def test_agent_audit_records_unreachable_signer(chain: Chain) -> None:
    start(chain)

    async def list_then_sign() -> None:
        async with asyncssh.connect_agent(str(chain.agent_socket)) as agent:
            keys = await agent.get_keys()
            # The signer goes away between the listing and the signature.
            assert chain.signer is not None
            chain.signer.kill()
            with pytest.raises(ValueError):
                await keys[0].sign_async(b"data")

    asyncio.run(asyncio.wait_for(list_then_sign(), 60))

    entries = records(chain.agent_audit_log)
    assert entries[-1]["outcome"] == "unreachable"
    assert "signer" in entries[-1]["reason"]


def test_audit_verify_finds_edited_line(chain: Chain, sshd_factory) -> None:
    public_line = start(chain)
    sshd = sshd_factory(authorized_keys=[public_line])
    for _ in range(3):
        assert login(chain, sshd).returncode == 0

    intact = chain.tpmsigner_agent("audit", "verify", "--file", str(chain.agent_audit_log))
    assert intact.returncode == 0
    assert "3 entries, chain intact" in intact.stdout

    lines = chain.agent_audit_log.read_text().splitlines()
    lines[1] = lines[1].replace('"approved"', '"denied"')
    chain.agent_audit_log.write_text("\n".join(lines) + "\n")
    edited = chain.tpmsigner_agent("audit", "verify", "--file", str(chain.agent_audit_log), check=False)
    assert edited.returncode == 1
    assert edited.stderr.count("line 3") == 1
    assert "line 3: its 'prev' hash does not match line 2: line 2 was edited" in edited.stderr

    del lines[1]
    chain.agent_audit_log.write_text("\n".join(lines) + "\n")
    removed = chain.tpmsigner_agent("audit", "verify", "--file", str(chain.agent_audit_log), check=False)
    assert removed.returncode == 1
    assert "line 2" in removed.stderr


def test_audit_prints_readably(chain: Chain, sshd_factory) -> None:
    public_line = start(chain)
    sshd = sshd_factory(authorized_keys=[public_line])
    assert login(chain, sshd).returncode == 0

    shown = chain.tpmsigner_agent("audit", "--file", str(chain.agent_audit_log)).stdout
    as_json = chain.tpmsigner_agent("audit", "--json", "--file", str(chain.agent_audit_log)).stdout
    future = chain.tpmsigner_agent("audit", "--since", "2999-01-01", "--file", str(chain.agent_audit_log)).stdout

    assert f"approved     ssh-login {sshd.user}@127.0.0.1 (verified)" in shown
    assert json.loads(as_json.splitlines()[0])["outcome"] == "approved"
    assert future == ""


def test_signer_audit_and_status_show_last_request(chain: Chain, sshd_factory) -> None:
    public_line = start(chain)
    sshd = sshd_factory(authorized_keys=[public_line])
    assert login(chain, sshd).returncode == 0
    chain.set_decision("deny")
    assert login(chain, sshd).returncode == 255

    entries = records(chain.signer_audit_log)
    status = json.loads(chain.tpmsigner("status", "--json").stdout)

    assert [entry["outcome"] for entry in entries] == ["approved", "denied"]
    assert entries[0]["device"] == "test-laptop"
    assert entries[0]["key_label"] == "work"
    assert entries[0]["destination"]["verified"] is True
    assert status["last_request"]["outcome"] == "denied"
    assert "last request:" in chain.tpmsigner("status").stdout
    assert PIN not in chain.signer_audit_log.read_text()


def test_rotation_keeps_the_chain(tmp_path) -> None:
    from tpmsigner.audit import AuditLog

    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=400, keep=3)
    for number in range(12):
        log.append({"request_id": number, "outcome": "approved"})

    assert len(log.files()) >= 3
    assert log.verify().ok
    kept = [record["request_id"] for record in log.records()]
    assert kept == sorted(kept)
    assert kept[-1] == 11

    # A restarted writer continues the chain from the newest file.
    AuditLog(tmp_path / "audit.jsonl", max_bytes=400, keep=3).append({"request_id": 12, "outcome": "denied"})
    assert log.verify().ok

    # Editing the last line of an older file breaks the link into the next file.
    older = log.files()[-2]
    lines = older.read_text().splitlines()
    lines[-1] = lines[-1].replace('"approved"', '"error"')
    older.write_text("\n".join(lines) + "\n")
    broken = log.verify()
    assert not broken.ok
    assert broken.file == log.files()[-1]
    assert broken.first_bad_line == 1


def sign_through(socket_path) -> None:
    """Sign with the first key an agent lists, through asyncssh's agent client."""

    async def sign() -> None:
        async with asyncssh.connect_agent(str(socket_path)) as agent:
            keys = await agent.get_keys()
            await keys[0].sign_async(b"data")

    asyncio.run(asyncio.wait_for(sign(), 60))


@pytest.mark.parametrize("side", ["signer", "agent"])
def test_torn_last_line_is_cut_before_next_record(chain: Chain, side: str) -> None:
    start(chain)
    sign_through(chain.agent_socket)
    path = chain.signer_audit_log if side == "signer" else chain.agent_audit_log
    intact = path.read_bytes()
    # A crash of the host while a line was being written leaves the first
    # part of the line, with no line end, or a tail of zero bytes.
    chain.stop()
    path.write_bytes(intact + b'{"outcome":"appr' + b"\0" * 37)
    chain.start_signer()
    chain.start_agent()

    sign_through(chain.agent_socket)

    lines = path.read_bytes().splitlines(keepends=True)
    assert lines[0] == intact
    assert len(lines) == 2
    assert json.loads(lines[1])["outcome"] == "approved"
    assert AuditLog(path).verify().ok
    daemon = chain.signer if side == "signer" else chain.agent
    assert daemon is not None
    assert f"the audit log {path} ended in an incomplete line of 53 bytes" in daemon.log_text()


def test_two_agents_share_one_audit_chain(chain: Chain) -> None:
    start(chain)
    second_socket = chain.socket_dir / "second-agent.sock"
    first_agent = chain.agent
    second_agent = chain.start_agent("--socket", str(second_socket))
    chain.agent = first_agent
    try:
        for socket_path in (chain.agent_socket, second_socket, chain.agent_socket, second_socket):
            sign_through(socket_path)
    finally:
        second_agent.stop()

    assert len(records(chain.agent_audit_log)) == 4
    result = AuditLog(chain.agent_audit_log).verify()
    assert result.ok, result.reason


def test_rotation_by_another_writer_keeps_the_chain(tmp_path) -> None:
    first = AuditLog(tmp_path / "audit.jsonl", max_bytes=400, keep=3)
    second = AuditLog(tmp_path / "audit.jsonl", max_bytes=400, keep=3)
    for number in range(12):
        (first if number % 3 else second).append({"request_id": number, "outcome": "approved"})

    assert len(first.files()) == 4
    result = first.verify()
    assert result.ok, result.reason
    assert [record["request_id"] for record in first.records()][-1] == 11


def sshsig_data(namespace: str) -> bytes:
    """Return PROTOCOL.sshsig's signed data for ``namespace`` and a SHA-512 hash."""

    def string(value: bytes) -> bytes:
        return len(value).to_bytes(4, "big") + value

    return b"SSHSIG" + string(namespace.encode()) + string(b"") + string(b"sha512") + string(bytes(64))


def test_audit_and_status_escape_peer_text(chain: Chain) -> None:
    start(chain)
    namespace = "file\x1b[2J\x1b]0;forged\x07\u202e"

    async def sign() -> None:
        async with asyncssh.connect_agent(str(chain.agent_socket)) as agent:
            keys = await agent.get_keys()
            await keys[0].sign_async(sshsig_data(namespace))

    asyncio.run(asyncio.wait_for(sign(), 60))
    assert records(chain.agent_audit_log)[-1]["purpose"] == f"sshsig:{namespace}"

    shown = chain.tpmsigner_agent("audit").stdout
    status = chain.tpmsigner("status").stdout

    escaped = "sshsig:file\\x1b[2J\\x1b]0;forged\\x07\\u202e"
    for output in (shown, status):
        assert escaped in output
        assert "\x1b" not in output
        assert "\x07" not in output
        assert "\u202e" not in output


PARALLEL_WRITER = """
import sys
from pathlib import Path
from tpmsigner.audit import AuditLog

log = AuditLog(Path(sys.argv[1]), max_bytes=20_000, keep=50)
for number in range(150):
    log.append({"request_id": number, "writer": sys.argv[2], "outcome": "approved"})
log.flush()
"""


def test_parallel_writer_processes_keep_one_chain(tmp_path) -> None:
    path = tmp_path / "audit.jsonl"
    writers = [
        subprocess.Popen([sys.executable, "-c", PARALLEL_WRITER, str(path), name], stdin=subprocess.DEVNULL)
        for name in ("first", "second", "third")
    ]
    for writer in writers:
        assert writer.wait(timeout=120) == 0

    log = AuditLog(path, max_bytes=20_000, keep=50)
    assert len(log.files()) > 1
    result = log.verify()
    assert result.ok, result.reason
    assert result.lines == 450
    written = [(record["writer"], record["request_id"]) for record in log.records()]
    assert sorted(written) == sorted((name, number) for name in ("first", "second", "third") for number in range(150))


def test_signer_audit_shows_and_verifies(chain: Chain, sshd_factory) -> None:
    public_line = start(chain)
    sshd = sshd_factory(authorized_keys=[public_line])
    assert login(chain, sshd).returncode == 0

    shown = chain.tpmsigner("audit")
    verified = chain.tpmsigner("audit", "verify")
    as_json = [json.loads(line) for line in chain.tpmsigner("audit", "--json").stdout.splitlines()]

    assert "approved" in shown.stdout
    assert "key work (SHA256:" in shown.stdout
    assert "by test-laptop" in shown.stdout
    assert verified.stdout.strip() == f"{chain.signer_audit_log}: 1 entries, chain intact"
    assert [record["outcome"] for record in as_json] == ["approved"]


def test_audit_of_missing_log(chain: Chain) -> None:
    missing = chain.workdir / "no-such-audit.jsonl"

    shown = chain.tpmsigner_agent("audit", "--file", str(missing))
    verified = chain.tpmsigner("audit", "verify", "--file", str(missing), check=False)

    assert shown.returncode == 0
    assert shown.stdout == ""
    assert "no audit log here yet" in shown.stderr
    assert verified.returncode == 1
    assert f"{missing}: no audit log here yet" in verified.stderr
