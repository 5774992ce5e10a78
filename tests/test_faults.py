"""Faults of the parts around the chain: a lost TPM, killed daemons, other users, a full disk, no terminal.

Every test runs the real programs: swtpm, ``tpmsigner serve``,
``tpmsigner-agent run`` and OpenSSH or raw ssh-agent clients.  Time bounds
are only upper bounds, several times looser than what the code needs, so
that a loaded machine does not fail them.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncssh
import pytest
from asyncssh.packet import Byte, String, UInt32
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import TPM2_CAP, TPM2_PT
from tpm2_pytss.TCTILdr import TCTILdr

from tpmsigner.audit import AuditLog
from tpmsigner.protocol.channel import format_public_key
from tpmsigner.signer.worker import TPM_CALL_TIMEOUT
from tests.support import Swtpm, pid_is_running, wait_until
from tests.support.chain import AGENT_COMMAND, SIGNER_COMMAND, Chain
from tests.support.small_disk import PAGE, SmallDisk, SmallDiskUnavailable
from tests.test_agent_input import RawAgentClient
from tests.test_tpm_tampering import loaded_handles

PIN = "4711-faults"
SSH_AGENT_FAILURE = b"\x05"
SSH_AGENTC_SIGN_REQUEST = 13
SSH_AGENT_SIGN_RESPONSE = 14
# A short --tpm-timeout, so the tests of a stopped TPM do not wait 30 s.
SHORT_TPM_TIMEOUT = 3.0
NOBODY = 65534


def start(chain: Chain, *signer_args: str, **signer_options) -> str:
    """Create key 'work', pair, start the signer and the agent; return the .pub line."""
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer(*signer_args, **signer_options)
    chain.start_agent()
    return public_line


def send_sign_request(chain: Chain, public_line: str, data: bytes = b"data") -> RawAgentClient:
    """Open a connection to the agent and send one SSH_AGENTC_SIGN_REQUEST on it."""
    key = asyncssh.import_public_key(public_line)
    client = RawAgentClient(chain.agent_socket)
    client.send_message(Byte(SSH_AGENTC_SIGN_REQUEST) + String(key.public_data) + String(data) + UInt32(0))
    return client


def sign_reply(chain: Chain, public_line: str, data: bytes = b"data") -> bytes:
    """Return the agent's reply to one sign request (read with the client's 10 s timeout)."""
    client = send_sign_request(chain, public_line, data)
    try:
        return client.read_reply()
    finally:
        client.close()


def assert_signed(reply: bytes, public_line: str, data: bytes = b"data") -> None:
    assert reply[0] == SSH_AGENT_SIGN_RESPONSE, f"expected SSH_AGENT_SIGN_RESPONSE, got {reply[:1]!r}"
    signature = reply[5 : 5 + int.from_bytes(reply[1:5], "big")]
    assert asyncssh.import_public_key(public_line).verify(data, signature)


def write_approver(chain: Chain, name: str, body: str) -> Path:
    """Write an approver program that appends a line to ``NAME.calls`` for every request, then runs ``body``."""
    program = chain.workdir / name
    calls = chain.workdir / f"{name}.calls"
    header = f"#!{sys.executable}\nwith open({str(calls)!r}, 'a') as calls:\n    calls.write('call\\n')\n"
    program.write_text(header + body)
    program.chmod(0o755)
    return program


def approver_calls(program: Path) -> int:
    calls = program.with_name(program.name + ".calls")
    return len(calls.read_text().splitlines()) if calls.exists() else 0


def lockout_counter(tcti: str) -> int:
    esapi = ESAPI(TCTILdr.parse(tcti))
    try:
        _, data = esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 1)
        return int(data.data.tpmProperties[0].value)
    finally:
        esapi.close()


def stop_process(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    wait_until(lambda: not pid_is_running(pid), 10, f"pid {pid} to exit after SIGKILL")


# ---- the TPM is killed, restarted or stopped --------------------------------


def test_killed_tpm_fails_fast_then_recovers(chain: Chain, swtpm: Swtpm) -> None:
    public_line = start(chain)
    assert_signed(sign_reply(chain, public_line), public_line)
    assert chain.signer is not None and chain.agent is not None
    tcti = swtpm.tcti

    swtpm.kill()
    started = time.monotonic()
    refused = sign_reply(chain, public_line)
    elapsed = time.monotonic() - started
    listed = chain.ssh_add("-L")

    assert refused == SSH_AGENT_FAILURE
    # The signer's default TPM call timeout is 30 s; a dead TPM must not cost that.
    assert elapsed < TPM_CALL_TIMEOUT / 3
    assert len(chain.approver_requests()) == 1
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == public_line
    refusal = next(line for line in chain.signer.log_text().splitlines() if "request #2:" in line)
    assert "ERROR" in refusal
    assert repr(tcti) in refusal
    assert "not asking for a PIN" in refusal
    assert "the signer's TPM is not ready" in chain.agent.log_text()

    assert swtpm.start() == tcti, "swtpm came back on other ports, so the signer cannot reach it"
    assert_signed(sign_reply(chain, public_line, b"after restart"), public_line, b"after restart")
    assert len(chain.approver_requests()) == 2

    # Restarted with no request in between: only the TPM's reset count
    # shows that the storage key and session the signer had loaded are gone.
    swtpm.kill()
    assert swtpm.start() == tcti, "swtpm came back on other ports, so the signer cannot reach it"
    assert_signed(sign_reply(chain, public_line, b"second restart"), public_line, b"second restart")

    assert len(chain.approver_requests()) == 3
    assert "was reset or restarted" in chain.signer.log_text()
    assert chain.signer.is_running()
    assert chain.agent.is_running()
    assert "Traceback" not in chain.signer.log_text()


def test_tpm_lost_after_pin_fails(chain: Chain, swtpm: Swtpm) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    killed_marker = chain.workdir / "tpm-killed"
    # The first time, the approver kills swtpm after the person approved and
    # before it hands over the PIN; afterwards it only approves.
    approver = write_approver(
        chain,
        "kills-tpm",
        "import os, pathlib, signal, socket, time\n"
        f"marker = pathlib.Path({str(killed_marker)!r})\n"
        "if not marker.exists():\n"
        "    marker.write_text('')\n"
        f"    os.kill({swtpm.pid}, signal.SIGKILL)\n"
        "    deadline = time.monotonic() + 10\n"
        "    while time.monotonic() < deadline:\n"
        "        try:\n"
        f"            socket.create_connection(('127.0.0.1', {swtpm.server_port}), timeout=1).close()\n"
        "        except OSError:\n"
        "            break\n"
        "        time.sleep(0.05)\n"
        f"print({PIN!r})\n",
    )
    chain.start_signer(approver=f"command:{approver}")
    chain.start_agent()

    refused = sign_reply(chain, public_line)

    assert refused == SSH_AGENT_FAILURE
    assert killed_marker.exists()
    assert approver_calls(approver) == 1
    assert chain.signer is not None
    signer_log = chain.signer.log_text()
    assert "this request fails and its PIN is not sent again" in signer_log
    assert "signed with" not in signer_log

    swtpm.start()
    assert_signed(sign_reply(chain, public_line), public_line)
    assert approver_calls(approver) == 2


def stopped(swtpm: Swtpm) -> Callable[[], None]:
    """Stop swtpm with SIGSTOP and return the function that continues it."""
    assert swtpm.pid is not None
    pid = swtpm.pid
    os.kill(pid, signal.SIGSTOP)
    return lambda: os.kill(pid, signal.SIGCONT)


def test_stopped_tpm_times_out_then_fails_fast(chain: Chain, swtpm: Swtpm) -> None:
    public_line = start(chain, "--tpm-timeout", str(SHORT_TPM_TIMEOUT))
    assert chain.signer is not None

    resume = stopped(swtpm)
    try:
        timed_out = sign_reply(chain, public_line)
        rejected = sign_reply(chain, public_line)
        listed = chain.ssh_add("-L")
        log_while_stopped = chain.signer.log_text()
    finally:
        resume()

    assert timed_out == SSH_AGENT_FAILURE
    assert rejected == SSH_AGENT_FAILURE
    assert f"timed out: no response within {SHORT_TPM_TIMEOUT:g} s" in log_while_stopped
    # The second request does not queue behind the stuck call: it is
    # rejected at once, naming the call that is still waiting.
    assert "the TPM has not responded to a command sent" in log_while_stopped
    assert "requests are rejected until it responds" in log_while_stopped
    assert chain.approver_requests() == []
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == public_line

    wait_until(
        lambda: "TPM calls are accepted again" in chain.signer.log_text(), 20, "the stuck TPM call to return"
    )
    assert_signed(sign_reply(chain, public_line), public_line)
    assert len(chain.approver_requests()) == 1


def test_signer_stops_with_stuck_tpm_call(chain: Chain, swtpm: Swtpm) -> None:
    public_line = start(chain, "--tpm-timeout", str(SHORT_TPM_TIMEOUT))
    assert chain.signer is not None

    resume = stopped(swtpm)
    try:
        assert sign_reply(chain, public_line) == SSH_AGENT_FAILURE
        # Raises if serve has not exited within 10 s of SIGTERM.
        chain.signer.stop()
    finally:
        resume()

    assert chain.signer.process.returncode == 0
    signer_log = chain.signer.log_text()
    assert "leaving it behind without closing the TPM context" in signer_log
    assert "signer stopped" in signer_log


def test_serve_start_fails_on_stopped_tpm(chain: Chain, swtpm: Swtpm) -> None:
    chain.keygen("work", PIN)

    resume = stopped(swtpm)
    try:
        result = chain.tpmsigner(
            "serve",
            "--listen",
            f"127.0.0.1:{chain.signer_port}",
            "--approver",
            f"command:{chain.approver_program}",
            "--no-mdns",
            "--tpm-timeout",
            str(SHORT_TPM_TIMEOUT),
            check=False,
        )
    finally:
        resume()

    assert result.returncode == 1
    assert f"timed out: no response within {SHORT_TPM_TIMEOUT:g} s" in result.stderr
    assert "Traceback" not in result.stderr


def run_second_serve(chain: Chain, listen: str, *global_options: str) -> subprocess.CompletedProcess[str]:
    """Run another serve on a home of its own beside the chain's signer, and return when it exits."""
    return subprocess.run(
        [
            *chain.command_prefix, *SIGNER_COMMAND, "--home", str(chain.workdir / "second-home"), *global_options,
            "serve", "--listen", listen, "--approver", f"command:{chain.approver_program}", "--no-mdns",
        ],
        env=chain.environment(),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_second_serve_leaves_first_alone(chain: Chain, swtpm: Swtpm) -> None:
    public_line = start(chain)
    assert_signed(sign_reply(chain, public_line), public_line)
    assert chain.signer is not None
    handles_before = loaded_handles(swtpm.tcti)
    assert handles_before["transient"] != []
    assert handles_before["sessions"] != []

    # Another home, so that the home lock does not stop it before it binds.
    second = run_second_serve(chain, f"127.0.0.1:{chain.signer_port}")

    assert second.returncode == 1
    assert f"cannot listen on 127.0.0.1:{chain.signer_port}" in second.stderr
    assert "flushed" not in second.stderr
    assert "Traceback" not in second.stderr
    # Without a resource manager, a flush by the second serve would remove
    # the storage key and session that the running serve has loaded.
    assert loaded_handles(swtpm.tcti) == handles_before
    assert_signed(sign_reply(chain, public_line, b"after the second serve"), public_line, b"after the second serve")
    assert "no longer has" not in chain.signer.log_text()
    assert chain.signer.is_running()


@pytest.mark.parametrize("spelling", ["same", "respelled"])
def test_second_serve_on_same_tpm_refused(chain: Chain, swtpm: Swtpm, spelling: str) -> None:
    public_line = start(chain)
    assert_signed(sign_reply(chain, public_line), public_line)
    assert chain.signer is not None
    handles_before = loaded_handles(swtpm.tcti)
    port = swtpm.tcti.rpartition("port=")[2].split(",")[0]
    tcti = swtpm.tcti if spelling == "same" else f"swtpm:port={port},host=localhost"

    # Another home and another port, so only the claim on the TPM can stop it.
    second = run_second_serve(chain, "127.0.0.1:0", "--tcti", tcti)

    assert second.returncode == 1
    assert f"another 'tpmsigner serve' (pid {chain.signer.process.pid}, uid {os.getuid()}) uses the TPM" in second.stderr
    assert "flushed" not in second.stderr
    assert "Traceback" not in second.stderr
    assert loaded_handles(swtpm.tcti) == handles_before
    assert_signed(sign_reply(chain, public_line, b"after the refused serve"), public_line, b"after the refused serve")
    assert chain.signer.is_running()


def test_second_serve_on_same_home_refused(chain: Chain, swtpm: Swtpm) -> None:
    public_line = start(chain)
    assert_signed(sign_reply(chain, public_line), public_line)
    assert chain.signer is not None
    handles_before = loaded_handles(swtpm.tcti)

    # Another port, so only the home lock can stop it.
    second = chain.tpmsigner(
        "serve", "--listen", "127.0.0.1:0", "--approver", f"command:{chain.approver_program}", "--no-mdns",
        check=False,
    )

    assert second.returncode == 1
    assert f"another 'tpmsigner serve' (pid {chain.signer.process.pid}) is running" in second.stderr
    assert "Traceback" not in second.stderr
    assert loaded_handles(swtpm.tcti) == handles_before
    assert_signed(sign_reply(chain, public_line, b"after the refused serve"), public_line, b"after the refused serve")
    assert chain.signer.is_running()


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf"])
def test_serve_rejects_bad_tpm_timeout(chain: Chain, timeout: str) -> None:
    result = chain.tpmsigner(
        "serve", "--listen", "127.0.0.1:0", "--approver", f"command:{chain.approver_program}", "--tpm-timeout", timeout,
        check=False,
    )

    assert result.returncode == 1
    assert "--tpm-timeout must be a positive, finite number" in result.stderr


# ---- the signer or the agent is killed ---------------------------------------


def test_killed_signer_fails_pending_request(chain: Chain) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    deciding = chain.workdir / "approver-deciding"
    # An approver that takes its time, as a person would.
    slow_approver = write_approver(
        chain,
        "slow",
        f"import os, time\nopen({str(deciding)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)\nprint({PIN!r})\n",
    )
    approval_timeout = 60.0
    chain.start_signer(approver=f"command:{slow_approver}", approval_timeout=approval_timeout)
    agent = chain.start_agent()
    assert chain.signer is not None

    waiting = send_sign_request(chain, public_line)
    try:
        wait_until(lambda: deciding.exists() and deciding.read_text() != "", 20, "the approver to be asked")
        chain.signer.kill()
        killed_at = time.monotonic()
        reply = waiting.read_reply()
        answered_after = time.monotonic() - killed_at
    finally:
        waiting.close()
        # serve starts the approver with a parent-death signal, so the
        # kernel ends it with the killed signer.  This only stops a leak.
        stop_process(int(deciding.read_text()))

    assert reply == SSH_AGENT_FAILURE
    assert answered_after < approval_timeout / 6
    assert "connection to signer 'test-signer' closed" in agent.log_text()

    # With the signer down, a request fails at once instead of hanging.
    assert sign_reply(chain, public_line) == SSH_AGENT_FAILURE
    assert "cannot connect to signer 'test-signer'" in agent.log_text()

    chain.start_signer()
    assert_signed(sign_reply(chain, public_line), public_line)
    assert chain.agent is agent
    assert agent.is_running()
    assert agent.log_text().count("connected to signer 'test-signer'") == 2


def run_agent(chain: Chain) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AGENT_COMMAND, "--home", str(chain.agent_home), "run", "--socket", str(chain.agent_socket), "--foreground"],
        env=chain.environment(),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def test_killed_agent_socket_is_taken_over(chain: Chain) -> None:
    public_line = start(chain)
    assert chain.agent is not None
    chain.agent.kill()
    # SIGKILL leaves the socket file behind, with nothing listening on it.
    assert stat.S_ISSOCK(chain.agent_socket.lstat().st_mode)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(ConnectionRefusedError):
        probe.connect(str(chain.agent_socket))
    probe.close()

    chain.start_agent()
    listed = chain.ssh_add("-L")

    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == public_line
    assert_signed(sign_reply(chain, public_line), public_line)


def test_second_agent_leaves_live_socket_alone(chain: Chain) -> None:
    public_line = start(chain)
    socket_inode = chain.agent_socket.stat().st_ino

    second = run_agent(chain)

    assert second.returncode == 1
    assert f"another agent is already serving on {chain.agent_socket}" in second.stderr
    assert "stop it first or choose another path" in second.stderr
    assert chain.agent_socket.stat().st_ino == socket_inode
    assert chain.agent is not None and chain.agent.is_running()
    listed = chain.ssh_add("-L")
    assert listed.stdout.strip() == public_line
    assert_signed(sign_reply(chain, public_line), public_line)


# ---- another user on the agent socket ----------------------------------------


def as_nobody(chain: Chain, *argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
        env=chain.agent_environment(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="running a client as another uid needs root")
def test_other_uid_refused_despite_open_mode(chain: Chain) -> None:
    public_line = start(chain)
    # Loosen every file permission, so that only the agent's own check
    # keeps another user away from the keys.
    chain.agent_socket.parent.chmod(0o777)
    chain.agent_socket.chmod(0o777)
    pub_file = chain.agent_socket.parent / "work.pub"
    pub_file.write_text(public_line + "\n")
    pub_file.chmod(0o644)

    listed = as_nobody(chain, "ssh-add", "-L")
    signed = as_nobody(chain, "ssh-keygen", "-Y", "sign", "-n", "file", "-f", str(pub_file), stdin="message\n")

    assert listed.returncode != 0
    assert listed.stdout == ""
    assert signed.returncode != 0
    assert "SSH SIGNATURE" not in signed.stdout
    assert chain.approver_requests() == []
    assert chain.agent is not None
    agent_log = chain.agent.log_text()
    assert f"refused an agent connection from uid {NOBODY}" in agent_log
    assert "only uid 0, which runs this agent, and root may use it" in agent_log
    owner_listing = chain.ssh_add("-L")
    assert owner_listing.stdout.strip() == public_line


# ---- a full disk -------------------------------------------------------------


@pytest.fixture
def small_disk(request: pytest.FixtureRequest) -> Iterator[Callable[[Path], SmallDisk]]:
    """A function that mounts a small private tmpfs over a directory and returns it as a SmallDisk."""
    disks: list[SmallDisk] = []

    def mount(mountpoint: Path) -> SmallDisk:
        disk = SmallDisk(mountpoint)
        try:
            disk.start()
        except SmallDiskUnavailable as exc:
            pytest.skip(f"{exc}; the full-disk tests need root on a machine that allows mount namespaces")
        disks.append(disk)
        return disk

    yield mount
    for disk in disks:
        disk.stop()


def snapshot(directory: Path) -> dict[str, bytes]:
    """Return every file under ``directory`` (hidden temporary files included) by relative path."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != ".filler"
    }


def on_small_disk(chain: Chain, small_disk: Callable[[Path], SmallDisk], directory: Path) -> SmallDisk:
    """Mount a small tmpfs over ``directory`` with its current files, and run the chain's commands on it."""
    directory.mkdir(parents=True, exist_ok=True)
    disk = small_disk(directory)
    disk.copy_in(directory)
    chain.command_prefix = disk.wrap([])
    return disk


# Case: (program, its arguments, the file it fails to write, pages left free).
FULL_DISK_COMMANDS = {
    "disable": ("signer", ("disable", "work"), "keys/work.json", 0),
    "allow": ("signer", ("allow", "second-laptop", format_public_key(b"\x07" * 32)), "devices.json", 0),
    "keygen": ("signer", ("keygen", "second", "--pin-file", "PIN_FILE"), "keys/second.tss", 0),
    # The key file takes the last page and its metadata finds none.
    "keygen-half": ("signer", ("keygen", "second", "--pin-file", "PIN_FILE"), "keys/second.json", 1),
    "trust": ("agent", ("trust", "second-signer", "127.0.0.1:9", format_public_key(b"\x08" * 32)), "signers.json", 0),
}


@pytest.mark.parametrize("case", list(FULL_DISK_COMMANDS))
def test_full_disk_keeps_previous_files(chain: Chain, small_disk, case: str) -> None:
    side, args, written_file, pages_left = FULL_DISK_COMMANDS[case]
    chain.keygen("work", PIN)
    chain.pair()
    pin_file = chain.workdir / "second.pin"
    pin_file.write_text(PIN + "\n")
    args = tuple(str(pin_file) if arg == "PIN_FILE" else arg for arg in args)
    home = chain.signer_home if side == "signer" else chain.agent_home
    run = chain.tpmsigner if side == "signer" else chain.tpmsigner_agent

    disk = on_small_disk(chain, small_disk, home)
    files = disk.view(home)
    before = snapshot(files)
    disk.fill(pages_left)
    assert disk.free_bytes() == pages_left * PAGE

    failed = run(*args, check=False)

    assert failed.returncode == 1
    assert f"cannot write {home / written_file}: No space left on device" in failed.stderr
    assert "the previous version of the file is unchanged. Free some disk space and try again" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert snapshot(files) == before

    disk.free()
    run(*args)
    after = snapshot(files)
    assert after.get(written_file) is not None
    assert after.get(written_file) != before.get(written_file)


def audit_lines(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


@pytest.mark.parametrize("side", ["signer", "agent"])
def test_full_disk_keeps_audit_log_whole(chain: Chain, small_disk, side: str) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    audit_path = chain.signer_audit_log if side == "signer" else chain.agent_audit_log
    # The signer's log is in its home; the agent's in $XDG_STATE_HOME.
    directory = chain.signer_home if side == "signer" else chain.workdir / "state"
    disk = on_small_disk(chain, small_disk, directory)
    signer = chain.start_signer()
    agent = chain.start_agent()
    daemon = signer if side == "signer" else agent
    audit = disk.view(audit_path)
    assert_signed(sign_reply(chain, public_line), public_line)
    assert audit_lines(audit) == 1

    disk.fill()
    # A full disk still takes a line that fits in the room left in the
    # log's last page, so sign until a record is refused.  That record
    # usually fits in part, which is what the log must not keep.
    for _ in range(20):
        before = audit.read_bytes()
        assert_signed(sign_reply(chain, public_line), public_line)
        if audit.read_bytes() == before:
            break
    else:
        raise AssertionError("twenty audit records were all written on a full disk")

    daemon_log = daemon.log_text()
    assert "was not written: cannot append to the audit log" in daemon_log
    assert "outcome approved) was not written" in daemon_log
    assert "No space left on device; the log is unchanged" in daemon_log
    assert before.endswith(b"\n")
    assert AuditLog(audit).verify().ok

    disk.free()
    assert_signed(sign_reply(chain, public_line), public_line)
    assert audit_lines(audit) == len(before.splitlines()) + 1
    assert AuditLog(audit).verify().ok


# ---- no terminal for the tty approver -----------------------------------------


def test_tty_approver_without_terminal_stops_serve(chain: Chain) -> None:
    chain.keygen("work", PIN)
    environment = chain.environment()
    environment.pop("DISPLAY", None)
    environment.pop("WAYLAND_DISPLAY", None)

    # As under systemd: a session of its own, no controlling terminal,
    # stdin from /dev/null and no display.
    result = subprocess.run(
        ["setsid", *chain.tpmsigner_command(), "serve", "--listen", f"127.0.0.1:{chain.signer_port}",
         "--approver", "tty", "--no-mdns"],
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert "the tty approver needs a terminal, but /dev/tty cannot be opened" in result.stderr
    assert "run serve in a terminal, or use --approver command:PROGRAM" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", chain.signer_port), timeout=5).close()


def start_on_terminal(chain: Chain) -> tuple[str, int]:
    """Start serve with the tty approver on a new pseudo-terminal, ignoring SIGHUP as under nohup.

    Returns the .pub line and the terminal's controller fd.
    """
    public_line = chain.keygen("work", PIN)
    chain.pair()
    controller, terminal = pty.openpty()
    try:
        chain.start_signer(approver="tty", approval_timeout=60.0, controlling_tty=terminal, ignore_hangup=True)
    finally:
        os.close(terminal)
    chain.start_agent()
    return public_line, controller


def read_terminal_until(controller: int, marker: bytes, timeout: float) -> bytes:
    output = b""
    deadline = time.monotonic() + timeout
    while marker not in output:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the terminal never showed {marker!r}; it showed {output!r}")
        readable, _, _ = select.select([controller], [], [], remaining)
        if readable:
            output += os.read(controller, 4096)
    return output


def assert_refused_without_tpm(chain: Chain, swtpm: Swtpm, counter_before: int, reply: bytes) -> None:
    assert reply == SSH_AGENT_FAILURE
    assert chain.signer is not None and chain.signer.is_running()
    signer_log = chain.signer.log_text()
    assert "signed with" not in signer_log
    assert "Traceback" not in signer_log
    assert lockout_counter(swtpm.tcti) == counter_before
    last_record = AuditLog(chain.signer_audit_log).last()
    assert last_record is not None
    assert last_record["outcome"] == "denied"


def test_lost_terminal_refuses_without_tpm(chain: Chain, swtpm: Swtpm) -> None:
    public_line, controller = start_on_terminal(chain)
    counter_before = lockout_counter(swtpm.tcti)
    # Closing the terminal hangs it up; serve ignores SIGHUP and keeps running.
    os.close(controller)

    started = time.monotonic()
    reply = sign_reply(chain, public_line)
    elapsed = time.monotonic() - started

    assert_refused_without_tpm(chain, swtpm, counter_before, reply)
    # The approval timeout is 60 s; with no terminal there is nothing to wait for.
    assert elapsed < 10
    assert chain.signer is not None
    assert "the tty approver has no terminal to ask on: /dev/tty cannot be opened" in chain.signer.log_text()


def test_terminal_closed_during_prompt_refuses(chain: Chain, swtpm: Swtpm) -> None:
    public_line, controller = start_on_terminal(chain)
    counter_before = lockout_counter(swtpm.tcti)

    waiting = send_sign_request(chain, public_line)
    try:
        try:
            read_terminal_until(controller, b"PIN for work", timeout=20)
        finally:
            os.close(controller)
        closed_at = time.monotonic()
        reply = waiting.read_reply()
        answered_after = time.monotonic() - closed_at
    finally:
        waiting.close()

    assert_refused_without_tpm(chain, swtpm, counter_before, reply)
    assert answered_after < 10
    assert chain.signer is not None
    assert "request #1: the terminal /dev/tty failed while asking for the PIN" in chain.signer.log_text()
