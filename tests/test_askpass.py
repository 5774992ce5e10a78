"""The askpass approver with small SSH_ASKPASS programs, in the chain and on its own."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tpmsigner.errors import ConfigError
from tpmsigner.protocol.messages import ProcessInfo
from tpmsigner.signer.approvers import ApprovalRequest
from tpmsigner.signer.approvers import MAX_PIN_OUTPUT
from tpmsigner.signer.askpass import AskpassApprover
from tpmsigner.signer.requesttext import MAX_PROCESS_CHARS
from tests.support import pid_is_running, wait_until
from tests.support.chain import Chain

PIN = "4711-askpass"


def write_askpass(directory: Path, body: str) -> Path:
    """Write an askpass program that saves its argv and environment to seen.json, then runs ``body``."""
    program = directory / "askpass"
    program.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"json.dump({{'argv': sys.argv, 'env': dict(os.environ)}}, open({str(directory / 'seen.json')!r}, 'w'))\n"
        + body
    )
    program.chmod(0o755)
    return program


def seen(directory: Path) -> dict[str, object]:
    return json.loads((directory / "seen.json").read_text())


def make_request() -> ApprovalRequest:
    return ApprovalRequest(
        request_id=3,
        key_label="work",
        key_fingerprint="SHA256:abc",
        device="laptop",
        process=ProcessInfo(pid=42, uid=1000, executable="/usr/bin/git", command_line="git commit -S"),
        purpose="sshsig:git",
        destination="",
    )


def ask(approver: AskpassApprover, request: ApprovalRequest | None = None) -> str | None:
    return asyncio.run(approver.request_pin(request or make_request()))


def test_ssh_askpass_program_signs(chain: Chain) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    program = write_askpass(chain.workdir, f"print({PIN!r})\n")
    # ssh sets SSH_ASKPASS_PROMPT=confirm for a yes-or-no question; the
    # approver asks for a secret, so the program must not see it.
    chain.extra_environment.update(SSH_ASKPASS=str(program), SSH_ASKPASS_PROMPT="confirm")
    chain.start_signer(approver="askpass")
    chain.start_agent()
    pub_file = chain.workdir / "work.pub"
    pub_file.write_text(public_line + "\n")
    message = chain.workdir / "message.txt"
    message.write_text("to be signed\n")

    signing = subprocess.run(
        ["ssh-keygen", "-Y", "sign", "-n", "file", "-f", str(pub_file), str(message)],
        env=chain.agent_environment(),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )

    assert signing.returncode == 0, signing.stderr
    record = seen(chain.workdir)
    argv = record["argv"]
    assert isinstance(argv, list)
    assert len(argv) == 2
    prompt = argv[1]
    assert prompt.startswith("Signature request #1\n")
    assert "device: test-laptop\n" in prompt
    assert "key: work (SHA256:" in prompt
    assert "purpose: sshsig:file\n" in prompt
    assert "process: ssh-keygen" in prompt
    assert prompt.endswith("\n\nPIN to sign, or cancel to refuse:")
    environment = record["env"]
    assert isinstance(environment, dict)
    assert "SSH_ASKPASS_PROMPT" not in environment
    assert environment["TPMSIGNER_DEVICE"] == "test-laptop"


def test_missing_ssh_askpass_stops_serve(chain: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_ASKPASS", raising=False)

    result = chain.tpmsigner("serve", "--listen", f"127.0.0.1:{chain.signer_port}", "--approver", "askpass", check=False)

    assert result.returncode == 1
    assert "SSH_ASKPASS is not set" in result.stderr
    assert "askpass:PROGRAM" in result.stderr


def test_missing_askpass_program_fails_check(tmp_path: Path) -> None:
    approver = AskpassApprover(str(tmp_path / "no-such-askpass"))

    with pytest.raises(ConfigError, match="was not found or is not executable"):
        approver.check()


def test_askpass_cancel_refuses(tmp_path: Path) -> None:
    program = write_askpass(tmp_path, "sys.exit(1)\n")

    assert ask(AskpassApprover(str(program))) is None


def test_askpass_empty_answer_refuses(tmp_path: Path) -> None:
    program = write_askpass(tmp_path, "print()\n")

    assert ask(AskpassApprover(str(program))) is None


def test_askpass_first_line_is_the_pin(tmp_path: Path) -> None:
    program = write_askpass(tmp_path, f"print({PIN!r})\nprint('second line')\n")

    assert ask(AskpassApprover(str(program))) == PIN


def test_askpass_output_is_capped(tmp_path: Path) -> None:
    program = write_askpass(tmp_path, "sys.stdout.write('x' * 10_000_000)\n")

    assert ask(AskpassApprover(str(program))) == "x" * MAX_PIN_OUTPUT


def test_askpass_timeout_kills_process_group(tmp_path: Path) -> None:
    helper_pid_file = tmp_path / "helper.pid"
    program = write_askpass(
        tmp_path,
        "import subprocess, time\n"
        f"helper = subprocess.Popen(['sleep', '100'])\nopen({str(helper_pid_file)!r}, 'w').write(str(helper.pid))\n"
        "time.sleep(100)\n",
    )
    approver = AskpassApprover(str(program), timeout=3.0)

    with pytest.raises(TimeoutError):
        ask(approver)

    helper_pid = int(helper_pid_file.read_text())
    wait_until(lambda: not pid_is_running(helper_pid), 5, "the askpass helper to be killed")


def test_askpass_prompt_escapes_and_shortens_peer_text(tmp_path: Path) -> None:
    program = write_askpass(tmp_path, "sys.exit(1)\n")
    # The requester chooses its command line and, through known_hosts
    # lookups, the host name.  Both try to draw lines of their own.
    command_line = "ssh " + "-o SendEnv=X " * 100 + "alice@host\x1b[2J"
    request = dataclasses.replace(
        make_request(),
        process=ProcessInfo(pid=42, uid=1000, executable="/usr/bin/ssh", command_line=command_line),
        purpose="ssh-login",
        destination="alice@host\nkey: other (SHA256:forged)",
    )

    assert ask(AskpassApprover(str(program)), request) is None

    prompt = seen(tmp_path)["argv"][1]
    assert isinstance(prompt, str)
    assert "\x1b" not in prompt
    assert "destination: alice@host\\x0akey: other (SHA256:forged) (NOT verified)\n" in prompt
    assert [line for line in prompt.splitlines() if line.startswith("key: ")] == ["key: work (SHA256:abc)"]
    # The long command line is cut in the middle, so its end, which names the destination, stays.
    process_line = next(line for line in prompt.splitlines() if line.startswith("process: "))
    assert len(process_line) == len("process: ") + MAX_PROCESS_CHARS
    assert process_line.endswith("alice@host\\x1b[2J")
