"""Approvers in the running signer: command:, tty, and their failure modes."""

from __future__ import annotations

import asyncio
import base64
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import TPM2_CAP, TPM2_PT
from tpm2_pytss.TCTILdr import TCTILdr

from tests.support import pid_is_running, wait_until
from tests.support.chain import Chain
from tpmsigner.protocol.messages import Failure, FailureCode, ProcessInfo, SignRequest

PIN = "4711-approvers"


def lockout_counter(tcti: str) -> int:
    esapi = ESAPI(TCTILdr.parse(tcti))
    try:
        _, data = esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 1)
        return int(data.data.tpmProperties[0].value)
    finally:
        esapi.close()


def sign_with_ssh_keygen(chain: Chain, public_line: str, namespace: str = "file") -> subprocess.Popen[str]:
    pub_file = chain.workdir / "work.pub"
    pub_file.write_text(public_line + "\n")
    message = chain.workdir / "message.txt"
    message.write_text("to be signed\n")
    return subprocess.Popen(
        ["ssh-keygen", "-Y", "sign", "-n", namespace, "-f", str(pub_file), str(message)],
        env=chain.agent_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def write_approver(chain: Chain, name: str, body: str) -> str:
    program = chain.workdir / name
    program.write_text(f"#!{sys.executable}\n{body}")
    program.chmod(0o755)
    return str(program)


def test_hanging_approver_is_killed_and_refuses(chain: Chain) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    pid_file = chain.workdir / "approver.pid"
    approver = write_approver(
        chain,
        "hang",
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n",
    )
    chain.start_signer(approver=f"command:{approver}", approval_timeout=1.0)
    chain.start_agent()

    started = time.monotonic()
    signing = sign_with_ssh_keygen(chain, public_line)
    _, stderr = signing.communicate(timeout=30)

    assert signing.returncode != 0, stderr
    assert time.monotonic() - started < 15
    assert chain.signer is not None
    assert "no approval within 1 s: denied" in chain.signer.log_text()
    approver_pid = int(pid_file.read_text())
    wait_until(lambda: not pid_is_running(approver_pid), 5, "the timed-out approver to be killed")


def test_approver_dies_with_killed_serve(chain: Chain) -> None:
    # SIGKILL gives serve no chance to kill its approver, so the kernel
    # must: otherwise a prompt asks for a PIN that nothing will read.
    public_line = chain.keygen("work", PIN)
    chain.pair()
    pid_file = chain.workdir / "approver.pid"
    approver = write_approver(
        chain,
        "waits",
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n",
    )
    chain.start_signer(approver=f"command:{approver}")
    chain.start_agent()

    signing = sign_with_ssh_keygen(chain, public_line)
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text() != "", 30, "the approver to start")
        approver_pid = int(pid_file.read_text())
        assert pid_is_running(approver_pid)
        assert chain.signer is not None
        chain.signer.kill()
        wait_until(lambda: not pid_is_running(approver_pid), 10, "the approver to die with serve")
    finally:
        signing.kill()
        signing.communicate(timeout=30)


def test_missing_approver_stops_serve_at_start(chain: Chain) -> None:
    chain.keygen("work", PIN)
    missing = chain.workdir / "no-such-program"

    result = chain.tpmsigner(
        "serve", "--listen", f"127.0.0.1:{chain.signer_port}", "--approver", f"command:{missing}", check=False
    )

    assert result.returncode == 1
    assert f"approver program {str(missing)!r} was not found or is not executable" in result.stderr


def test_vanished_approver_refuses_without_tpm(chain: Chain, swtpm) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    approver = write_approver(chain, "vanishing", f"print({PIN!r})\n")
    chain.start_signer(approver=f"command:{approver}")
    chain.start_agent()
    os.unlink(approver)
    counter_before = lockout_counter(swtpm.tcti)

    signing = sign_with_ssh_keygen(chain, public_line)
    _, stderr = signing.communicate(timeout=30)

    assert signing.returncode != 0, stderr
    assert chain.signer is not None
    signer_log = chain.signer.log_text()
    assert "cannot run approver" in signer_log
    assert "signed with" not in signer_log
    assert lockout_counter(swtpm.tcti) == counter_before


def test_approver_output_without_newline_is_the_pin(chain: Chain) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    approver = write_approver(chain, "no-newline", f"import sys\nsys.stdout.write({PIN!r})\n")
    chain.start_signer(approver=f"command:{approver}")
    chain.start_agent()

    signing = sign_with_ssh_keygen(chain, public_line)
    _, stderr = signing.communicate(timeout=30)

    assert signing.returncode == 0, stderr


def test_approver_exit_status_overrides_printed_pin(chain: Chain) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    approver = write_approver(chain, "prints-then-fails", f"print({PIN!r})\nraise SystemExit(3)\n")
    chain.start_signer(approver=f"command:{approver}")
    chain.start_agent()

    signing = sign_with_ssh_keygen(chain, public_line)
    signing.communicate(timeout=30)

    assert signing.returncode != 0
    assert chain.signer is not None
    assert "approver exited with status 3: denied" in chain.signer.log_text()


def read_terminal_until(master: int, marker: bytes, timeout: float) -> bytes:
    output = b""
    deadline = time.monotonic() + timeout
    while marker not in output:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"terminal never showed {marker!r}; it showed {output!r}")
        readable, _, _ = select.select([master], [], [], remaining)
        if readable:
            output += os.read(master, 4096)
    return output


def test_tty_approver_prompts_and_hides_pin(chain: Chain) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    master, slave = pty.openpty()
    try:
        chain.start_signer(approver="tty", controlling_tty=slave)
        chain.start_agent()

        signing = sign_with_ssh_keygen(chain, public_line)
        shown = read_terminal_until(master, b"PIN for work", timeout=20)
        os.write(master, PIN.encode() + b"\n")
        _, stderr = signing.communicate(timeout=30)
        time.sleep(0.2)
        readable, _, _ = select.select([master], [], [], 0.5)
        if readable:
            shown += os.read(master, 4096)
    finally:
        os.close(master)
        os.close(slave)

    assert signing.returncode == 0, stderr
    text = shown.decode(errors="replace")
    assert "Signature request" in text
    assert "device:      test-laptop" in text
    assert "purpose:     sshsig:file" in text
    assert "ssh-keygen" in text
    assert PIN not in text


def test_approver_grandchild_cannot_outlast_timeout(chain: Chain) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    pid_file = chain.workdir / "grandchild.pid"
    # The approver starts a helper that keeps stdout open, as a desktop
    # notifier might, and then hangs itself.
    approver = write_approver(
        chain,
        "spawns-helper",
        "import subprocess, time\n"
        f"helper = subprocess.Popen(['sleep', '100'])\nopen({str(pid_file)!r}, 'w').write(str(helper.pid))\n"
        "time.sleep(100)\n",
    )
    chain.start_signer(approver=f"command:{approver}", approval_timeout=1.0)
    chain.start_agent()

    started = time.monotonic()
    signing = sign_with_ssh_keygen(chain, public_line)
    signing.communicate(timeout=60)

    assert signing.returncode != 0
    assert time.monotonic() - started < 10
    helper_pid = int(pid_file.read_text())
    wait_until(lambda: not pid_is_running(helper_pid), 5, "the approver's helper to be killed")


def test_approver_huge_output_uses_first_line(chain: Chain) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    approver = write_approver(
        chain, "chatty", f"import sys\nprint({PIN!r})\nsys.stdout.write('x' * 10_000_000)\n"
    )
    chain.start_signer(approver=f"command:{approver}")
    chain.start_agent()

    signing = sign_with_ssh_keygen(chain, public_line)
    _, stderr = signing.communicate(timeout=60)

    assert signing.returncode == 0, stderr


@pytest.mark.parametrize("own_session", [False, True], ids=["same-group", "own-session"])
def test_approver_helper_holding_stdout_does_not_block(chain: Chain, own_session: bool) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    pid_file = chain.workdir / "helper.pid"
    # The approver approves and exits, but leaves a helper that inherited
    # its stdout, as a notifier started in the background might.
    approver = write_approver(
        chain,
        "leaves-helper",
        "import subprocess\n"
        f"helper = subprocess.Popen(['sleep', '100'], start_new_session={own_session})\n"
        f"open({str(pid_file)!r}, 'w').write(str(helper.pid))\n"
        f"print({PIN!r})\n",
    )
    signer = chain.start_signer(approver=f"command:{approver}", approval_timeout=20.0)
    chain.start_agent()
    try:
        signing = sign_with_ssh_keygen(chain, public_line)
        _, stderr = signing.communicate(timeout=60)
    finally:
        helper_pid = int(pid_file.read_text())
        if own_session and pid_is_running(helper_pid):
            # Out of the approver's process group, the helper is the approver's to stop.
            os.kill(helper_pid, signal.SIGKILL)

    assert signing.returncode == 0, stderr
    assert "no approval within" not in signer.log_text()
    assert "request #1: signed with 'work'" in signer.log_text()
    if not own_session:
        wait_until(lambda: not pid_is_running(helper_pid), 5, "the helper in the approver's group to be killed")


def test_tty_prompt_caps_long_fields_from_agent(chain: Chain) -> None:
    from tests.test_audit import sshsig_data
    from tests.test_limits import agent_device_key, exchange, open_device_channel

    public_line = chain.keygen("work", PIN)
    chain.pair()
    key_blob = base64.b64decode(public_line.split()[1])
    # A compromised agent host is not held to the agent's own 1,024-character
    # limit on command lines, and chooses the namespace freely.
    request = SignRequest(
        7,
        key_blob,
        sshsig_data("file" + "n" * 50_000),
        process=ProcessInfo(pid=42, uid=1000, executable="/usr/bin/ssh", command_line="ssh " + "x" * 100_000),
    )
    master, slave = pty.openpty()
    try:
        chain.start_signer(approver="tty", controlling_tty=slave)

        async def refuse_on_terminal() -> tuple[bytes, object]:
            secure = await open_device_channel(chain, agent_device_key(chain))
            try:
                reply = asyncio.create_task(exchange(secure, request))
                shown = await asyncio.to_thread(read_terminal_until, master, b"PIN for work", 20)
                os.write(master, b"\n")
                return shown, await reply
            finally:
                await secure.close()

        shown, reply = asyncio.run(refuse_on_terminal())
    finally:
        os.close(master)
        os.close(slave)

    assert isinstance(reply, Failure)
    assert reply.code == FailureCode.DENIED
    text = shown.decode(errors="replace")
    assert "device:      test-laptop" in text
    assert "key:         work" in text
    assert "purpose:     sshsig:filennn" in text
    assert "process:     ssh (pid 42, uid 1000): ssh xxx" in text
    assert len(text) < 2000


# The requester chooses the sshsig namespace.  The prompt shows it as the
# purpose and again in the command line of ssh-keygen, and here it tries to
# clear the screen and draw a prompt of its own.
HOSTILE_NAMESPACE = "ns\x1b[2J\nPIN for root: "
ESCAPED_NAMESPACE = "ns\\x1b[2J\\x0aPIN for root: "


def test_tty_approver_escapes_peer_text(chain: Chain) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    master, slave = pty.openpty()
    try:
        chain.start_signer(approver="tty", controlling_tty=slave)
        chain.start_agent()

        signing = sign_with_ssh_keygen(chain, public_line, namespace=HOSTILE_NAMESPACE)
        shown = read_terminal_until(master, b"PIN for work", timeout=20)
        # An empty line rejects the request.
        os.write(master, b"\n")
        signing.communicate(timeout=30)
    finally:
        os.close(master)
        os.close(slave)

    assert signing.returncode != 0
    text = shown.decode(errors="replace").replace("\r\n", "\n")
    assert f"  purpose:     sshsig:{ESCAPED_NAMESPACE}\n" in text
    # The process line is capped in length, so only the namespace's start shows there.
    assert ESCAPED_NAMESPACE[:16] in text.split("  process:     ", 1)[1].splitlines()[0]
    assert "\x1b" not in text
    assert "\nPIN for root" not in text


def test_command_approver_gets_escaped_peer_text(chain: Chain) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    chain.start_agent()

    signing = sign_with_ssh_keygen(chain, public_line, namespace=HOSTILE_NAMESPACE)
    _, stderr = signing.communicate(timeout=30)

    assert signing.returncode == 0, stderr
    (seen,) = chain.approver_requests()
    assert seen["TPMSIGNER_PURPOSE"] == f"sshsig:{ESCAPED_NAMESPACE}"
    assert ESCAPED_NAMESPACE in seen["TPMSIGNER_PROCESS"]
    for name, value in seen.items():
        assert "\x1b" not in value, name
        assert "\n" not in value, name
