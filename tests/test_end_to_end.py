"""The whole chain against real OpenSSH: ssh-add, ssh, sshd and ssh-keygen.

Each test runs swtpm, ``tpmsigner serve`` with a ``command:`` approver,
``tpmsigner-agent run`` and the OpenSSH tools as separate processes.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tpmsigner.protocol.channel import format_public_key
from tests.support.chain import Chain
from tests.support.sshsig import sign_and_check

PIN = "4711-correct-horse"


def start_paired_chain(chain: Chain, label: str = "work") -> str:
    public_line = chain.keygen(label, PIN)
    chain.pair()
    chain.start_signer()
    chain.start_agent()
    return public_line


def run_ssh(chain: Chain, sshd, command: str = "echo logged-in") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sshd.ssh_command(chain.agent_socket, command),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_ssh_add_lists_signer_keys(chain: Chain) -> None:
    public_line = start_paired_chain(chain)
    result = chain.ssh_add("-L")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == public_line


def test_approved_login_reaches_sshd(chain: Chain, sshd_factory) -> None:
    public_line = start_paired_chain(chain)
    sshd = sshd_factory(authorized_keys=[public_line])

    result = run_ssh(chain, sshd)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "logged-in"
    requests = chain.approver_requests()
    assert len(requests) == 1
    seen = requests[0]
    assert seen["TPMSIGNER_KEY_LABEL"] == "work"
    assert seen["TPMSIGNER_DEVICE"] == "test-laptop"
    assert seen["TPMSIGNER_PURPOSE"] == "ssh-login"
    assert seen["TPMSIGNER_DESTINATION"] == f"{sshd.user}@127.0.0.1"
    assert seen["TPMSIGNER_DESTINATION_VERIFIED"] == "yes"
    assert seen["TPMSIGNER_KEY_FINGERPRINT"].startswith("SHA256:")
    assert "ssh" in seen["TPMSIGNER_PROCESS"]
    assert f"-p {sshd.port}" in seen["TPMSIGNER_PROCESS"]


def test_login_fingerprint_matches_ssh_keygen(chain: Chain, tmp_path) -> None:
    public_line = start_paired_chain(chain)
    pub_file = tmp_path / "work.pub"
    pub_file.write_text(public_line + "\n")

    keygen_output = subprocess.run(["ssh-keygen", "-lf", str(pub_file)], capture_output=True, text=True, check=True)
    listing = chain.tpmsigner("list").stdout

    fingerprint = keygen_output.stdout.split()[1]
    assert fingerprint in listing
    assert "work" in listing
    assert "enabled" in listing


def test_sshsig_signature_verifies(chain: Chain, tmp_path) -> None:
    public_line = start_paired_chain(chain)
    message = tmp_path / "commit.txt"
    message.write_text("tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\n")

    result = sign_and_check(chain.agent_environment(), public_line, message)

    assert result.signed.returncode == 0, result.signed.stderr
    assert result.checked is not None
    checked = result.checked
    assert checked.returncode == 0, checked.stderr
    assert "Good \"git\" signature" in checked.stdout
    assert chain.approver_requests()[0]["TPMSIGNER_PURPOSE"] == "sshsig:git"
    assert chain.approver_requests()[0]["TPMSIGNER_DESTINATION"] == ""


def test_refusal_fails_login(chain: Chain, sshd_factory) -> None:
    public_line = start_paired_chain(chain)
    sshd = sshd_factory(authorized_keys=[public_line])
    chain.set_decision("deny")

    result = run_ssh(chain, sshd)

    assert result.returncode == 255
    assert "logged-in" not in result.stdout
    assert len(chain.approver_requests()) == 1
    assert chain.signer is not None
    assert "denied by the approver" in chain.signer.log_text()
    assert "signed with" not in chain.signer.log_text()


def test_wrong_pin_fails_login_without_retry(chain: Chain, sshd_factory) -> None:
    public_line = start_paired_chain(chain)
    sshd = sshd_factory(authorized_keys=[public_line])
    chain.set_approver_pin("not-the-pin")

    result = run_ssh(chain, sshd)

    assert result.returncode == 255
    assert len(chain.approver_requests()) == 1
    assert chain.signer is not None
    signer_log = chain.signer.log_text()
    assert "key 'work': signing failed: wrong PIN" in signer_log
    assert "tries left before the TPM locks out" in signer_log
    assert "not-the-pin" not in signer_log
    assert PIN not in signer_log


def test_unallowed_agent_gets_nothing(chain: Chain) -> None:
    chain.keygen("work", PIN)
    signer_key = chain.tpmsigner("id").stdout.strip()
    chain.tpmsigner_agent("trust", "test-signer", f"127.0.0.1:{chain.signer_port}", signer_key)
    chain.start_signer()
    chain.start_agent()

    result = chain.ssh_add("-L")

    assert result.returncode != 0
    assert "ecdsa-sha2-nistp256" not in result.stdout
    assert chain.approver_requests() == []
    assert chain.signer is not None
    assert "is not allowed" in chain.signer.log_text()
    assert "connected from" not in chain.signer.log_text()


def test_agent_rejects_impostor_signer(chain: Chain) -> None:
    chain.keygen("work", PIN)
    agent_key = chain.tpmsigner_agent("id").stdout.strip()
    chain.tpmsigner("allow", "test-laptop", agent_key)
    # Pin a key that is not the signer's: the agent must not talk to it.
    impostor_key = format_public_key(b"\x07" * 32)
    chain.tpmsigner_agent("trust", "test-signer", f"127.0.0.1:{chain.signer_port}", impostor_key)
    chain.start_signer()
    chain.start_agent()

    result = chain.ssh_add("-L")

    assert result.returncode != 0
    assert chain.agent is not None
    assert "not the pinned key" in chain.agent.log_text()


def test_signer_restart_needs_no_agent_restart(chain: Chain, sshd_factory) -> None:
    public_line = start_paired_chain(chain)
    sshd = sshd_factory(authorized_keys=[public_line])
    assert chain.ssh_add("-L").returncode == 0
    assert chain.signer is not None and chain.agent is not None
    agent_pid = chain.agent.process.pid

    chain.signer.kill()
    started = time.monotonic()
    while_down = chain.ssh_add("-L")
    assert while_down.returncode != 0
    assert time.monotonic() - started < 15

    chain.start_signer()
    after = chain.ssh_add("-L")
    assert after.returncode == 0, after.stderr
    assert after.stdout.strip() == public_line
    login = run_ssh(chain, sshd)
    assert login.returncode == 0, login.stderr
    assert chain.agent.process.pid == agent_pid
    assert chain.agent.is_running()


def test_ssh_add_lists_every_identity(chain: Chain) -> None:
    first = start_paired_chain(chain)
    second = chain.keygen("second", PIN)

    listed = chain.ssh_add("-L").stdout.splitlines()

    assert sorted(listed) == sorted([first, second])


@pytest.mark.parametrize("label", ["bad label", "-leading-dash", "", "a" * 65, "../escape"])
def test_keygen_rejects_invalid_labels(chain: Chain, label: str) -> None:
    pin_file = chain.workdir / "pin"
    pin_file.write_text(PIN + "\n")
    result = chain.tpmsigner("keygen", "--pin-file", str(pin_file), "--", label, check=False)
    assert result.returncode != 0
    assert "invalid label" in result.stderr
    assert result.stdout == ""
