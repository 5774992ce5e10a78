"""tpmsigner-agent run and trust: background mode, socket permissions, bad arguments.

A killed agent's socket and a second agent on a live one are in test_faults.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest

from tpmsigner.cli import build_parser as build_signer_parser
from tpmsigner.protocol.channel import format_public_key
from tpmsigner.store import default_home as signer_default_home
from tpmsigner_agent.cli import build_parser as build_agent_parser
from tpmsigner_agent.config import default_home as agent_default_home
from tests.support import pid_is_running, wait_until
from tests.support.chain import AGENT_COMMAND, Chain

PIN = "4711-agent-cli"


def run_agent_command(chain: Chain, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AGENT_COMMAND, "--home", str(chain.agent_home), "run", *args],
        env=env or chain.environment(),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def test_background_mode_prints_ssh_agent_lines(chain: Chain, short_tmp_path) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    environment = chain.environment()
    environment["XDG_RUNTIME_DIR"] = str(short_tmp_path)

    log_file = chain.workdir / "background-agent.log"
    result = run_agent_command(chain, "--log-file", str(log_file), env=environment)

    assert result.returncode == 0, result.stderr
    match = re.fullmatch(
        r"SSH_AUTH_SOCK=(\S+); export SSH_AUTH_SOCK;\nSSH_AGENT_PID=(\d+); export SSH_AGENT_PID;\necho Agent pid \2;\n",
        result.stdout,
    )
    assert match, result.stdout
    socket_path, agent_pid = match.group(1), int(match.group(2))
    try:
        assert os.stat(socket_path).st_mode & 0o777 == 0o600
        assert os.stat(os.path.dirname(socket_path)).st_mode & 0o777 == 0o700
        listed = subprocess.run(
            ["ssh-add", "-L"],
            env={**environment, "SSH_AUTH_SOCK": socket_path},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert listed.stdout.strip() == public_line
    finally:
        os.kill(agent_pid, signal.SIGTERM)
    wait_until(lambda: not pid_is_running(agent_pid), 10, "the background agent to exit")
    assert not os.path.exists(socket_path)
    assert "agent listening on" in log_file.read_text()
    assert os.stat(log_file).st_mode & 0o777 == 0o600


def start_background_agent(chain: Chain, *args: str, env: dict[str, str]) -> tuple[str, int]:
    """Start ``run`` in the background, wait until it serves, and return the socket path and pid that it prints."""
    result = run_agent_command(chain, *args, env=env)
    assert result.returncode == 0, result.stderr
    match = re.search(r"SSH_AUTH_SOCK=(\S+); .*\nSSH_AGENT_PID=(\d+);", result.stdout)
    assert match, result.stdout
    socket_path, agent_pid = match.group(1), int(match.group(2))

    # The agent handles SIGTERM only once it serves.  ssh-add -l exits with 2
    # while it cannot reach the agent, and with 1 for an agent without keys.
    def answers() -> bool:
        listed = subprocess.run(
            ["ssh-add", "-l"], env={**env, "SSH_AUTH_SOCK": socket_path}, capture_output=True, timeout=30
        )
        return listed.returncode in (0, 1)

    try:
        wait_until(answers, 15, "the background agent to answer ssh-add -l")
    except BaseException:
        os.kill(agent_pid, signal.SIGKILL)
        raise
    return socket_path, agent_pid


def stop_background_agent(agent_pid: int) -> None:
    os.kill(agent_pid, signal.SIGTERM)
    wait_until(lambda: not pid_is_running(agent_pid), 10, "the background agent to exit")


def test_default_socket_directory_removed_on_stop(chain: Chain, short_tmp_path) -> None:
    environment = chain.environment()
    environment["XDG_RUNTIME_DIR"] = str(short_tmp_path)

    socket_path, agent_pid = start_background_agent(chain, env=environment)
    stop_background_agent(agent_pid)
    directory = os.path.dirname(socket_path)

    assert os.path.basename(directory).startswith("tpmsigner-agent.")
    assert os.path.dirname(directory) == str(short_tmp_path)
    assert not os.path.exists(socket_path)
    assert not os.path.exists(directory)
    assert os.listdir(short_tmp_path) == []


def test_default_socket_directory_kept_when_not_empty(chain: Chain, short_tmp_path) -> None:
    environment = chain.environment()
    environment["XDG_RUNTIME_DIR"] = str(short_tmp_path)

    socket_path, agent_pid = start_background_agent(chain, env=environment)
    directory = os.path.dirname(socket_path)
    try:
        with open(os.path.join(directory, "not-the-agents"), "w") as other_file:
            other_file.write("kept\n")
    finally:
        stop_background_agent(agent_pid)

    assert not os.path.exists(socket_path)
    assert os.listdir(directory) == ["not-the-agents"]


def test_default_socket_directory_removed_on_error(chain: Chain, short_tmp_path) -> None:
    # The runtime directory is so long that the socket path in it exceeds
    # the 107 bytes of sun_path, so the agent fails after making its directory.
    runtime_directory = short_tmp_path / ("r" * 100)
    runtime_directory.mkdir()
    environment = chain.environment()
    environment["XDG_RUNTIME_DIR"] = str(runtime_directory)

    result = run_agent_command(chain, "--foreground", env=environment)

    assert result.returncode == 1
    assert "UNIX socket paths may have at most 107" in result.stderr
    assert os.listdir(runtime_directory) == []


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["term", "int", "hup"])
def test_stop_signal_right_after_bind_cleans_up(chain: Chain, short_tmp_path, stop_signal: signal.Signals) -> None:
    # The signal arrives as soon as the socket exists, before the agent
    # serves: it must still remove its socket and temporary directory.
    environment = chain.environment()
    environment["XDG_RUNTIME_DIR"] = str(short_tmp_path)
    process = subprocess.Popen(
        [*AGENT_COMMAND, "--home", str(chain.agent_home), "run", "--foreground"],
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: any(short_tmp_path.glob("tpmsigner-agent.*/agent.sock")), 30, "the agent's socket", 0.0005)
        process.send_signal(stop_signal)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)

    assert process.returncode == 0, stderr
    assert "agent stopped" in stderr
    assert os.listdir(short_tmp_path) == []


@pytest.mark.parametrize("existed", [True, False], ids=["existing", "created"])
def test_named_socket_directory_kept_on_stop(chain: Chain, short_tmp_path, existed: bool) -> None:
    directory = short_tmp_path / "sockets"
    if existed:
        directory.mkdir(mode=0o700)
    socket_path = directory / "agent.sock"

    reported_path, agent_pid = start_background_agent(chain, "--socket", str(socket_path), env=chain.environment())
    stop_background_agent(agent_pid)

    assert reported_path == str(socket_path)
    assert not socket_path.exists()
    assert directory.is_dir()


def test_socket_path_that_is_a_file_is_refused(chain: Chain) -> None:
    chain.agent_socket.write_text("not a socket")

    result = run_agent_command(chain, "--socket", str(chain.agent_socket), "--foreground")

    assert result.returncode == 1
    assert "is not a socket" in result.stderr
    assert chain.agent_socket.read_text() == "not a socket"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("trust", "home", "127.0.0.1", "tpmsigner-noise-x25519:AAAA"), "invalid address"),
        (("trust", "home", "127.0.0.1:7810", "ssh-ed25519 AAAA"), "invalid Noise public key"),
        (("trust", "bad name", "127.0.0.1:7810", "tpmsigner-noise-x25519:AAAA"), "invalid signer name"),
    ],
)
def test_trust_rejects_bad_arguments(chain: Chain, args: tuple[str, ...], message: str) -> None:
    result = chain.tpmsigner_agent(*args, check=False)
    assert result.returncode == 1
    assert message in result.stderr
    assert not (chain.agent_home / "signers.json").exists()


def test_trust_keeps_pinned_key_without_replace(chain: Chain) -> None:
    first = format_public_key(b"\x01" * 32)
    second = format_public_key(b"\x02" * 32)
    chain.tpmsigner_agent("trust", "home", "127.0.0.1:7810", first)

    refused = chain.tpmsigner_agent("trust", "home", "127.0.0.1:7810", second, check=False)
    assert refused.returncode == 1
    assert "already pinned" in refused.stderr
    assert "--replace" in refused.stderr
    assert first in (chain.agent_home / "signers.json").read_text()

    chain.tpmsigner_agent("trust", "home", "127.0.0.1:7810", second, "--replace")
    assert second in (chain.agent_home / "signers.json").read_text()
    assert first not in (chain.agent_home / "signers.json").read_text()


def test_allow_keeps_device_key_without_replace(chain: Chain) -> None:
    first = format_public_key(b"\x01" * 32)
    second = format_public_key(b"\x02" * 32)
    chain.tpmsigner("allow", "laptop", first)

    refused = chain.tpmsigner("allow", "laptop", second, check=False)
    assert refused.returncode == 1
    assert "already allowed" in refused.stderr
    assert first in (chain.signer_home / "devices.json").read_text()

    chain.tpmsigner("allow", "laptop", second, "--replace")
    assert second in (chain.signer_home / "devices.json").read_text()


def test_key_from_two_signers_is_listed_once(chain: Chain) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    signer_key = chain.tpmsigner("id").stdout.strip()
    chain.tpmsigner_agent("trust", "same-signer-again", f"127.0.0.1:{chain.signer_port}", signer_key)
    chain.start_signer()
    chain.start_agent()

    listed = chain.ssh_add("-L").stdout.splitlines()

    assert listed == [public_line]


@pytest.mark.parametrize(
    ("build_parser", "default_home", "variable"),
    [
        (build_signer_parser, signer_default_home, "TPMSIGNER_HOME"),
        (build_agent_parser, agent_default_home, "TPMSIGNER_AGENT_HOME"),
    ],
    ids=["tpmsigner", "tpmsigner-agent"],
)
def test_home_help_names_every_fallback(build_parser, default_home, variable: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    fallback = "~/" + str(default_home().relative_to(tmp_path))

    help_text = " ".join(build_parser().format_help().split())

    assert f"${variable}" in help_text
    assert f"$XDG_DATA_HOME/{default_home().name}" in help_text
    assert fallback in help_text


def test_signers_check_reports_each_signer(chain: Chain) -> None:
    chain.keygen("work", PIN)
    chain.pair("laptop")
    chain.start_signer()
    # A second pinned signer that nothing serves.
    chain.tpmsigner_agent("trust", "gone", "127.0.0.1:9", format_public_key(b"\x05" * 32))

    checked = chain.tpmsigner_agent("signers", "--check", "--json", check=False)
    text = chain.tpmsigner_agent("signers", "--check", check=False)

    assert checked.returncode == 1
    by_name = {record["name"]: record for record in json.loads(checked.stdout)}
    assert by_name["test-signer"]["reachable"] is True
    assert by_name["test-signer"]["identities"] == 1
    assert by_name["test-signer"]["error"] is None
    assert by_name["gone"]["reachable"] is False
    assert by_name["gone"]["identities"] is None
    assert "cannot connect to signer 'gone' at 127.0.0.1:9" in by_name["gone"]["error"]
    assert text.returncode == 1
    assert re.search(r"test-signer .* ok, 1 identities", text.stdout)
    assert re.search(r"gone .* unreachable", text.stdout)
    assert "gone: cannot connect to signer 'gone'" in text.stderr
    # Listing asks for no approval.
    assert chain.approver_requests() == []


def test_signers_check_names_revoked_agent(chain: Chain) -> None:
    chain.keygen("work", PIN)
    chain.pair("laptop")
    chain.start_signer()
    assert chain.tpmsigner_agent("signers", "--check").returncode == 0
    chain.tpmsigner("revoke", "laptop")

    result = chain.tpmsigner_agent("signers", "--check", check=False)

    assert result.returncode == 1
    assert re.search(r"test-signer .* unreachable", result.stdout)
    assert "tpmsigner allow" in result.stderr


def test_signers_without_check_print_nulls(chain: Chain) -> None:
    chain.pair("laptop")

    listed = json.loads(chain.tpmsigner_agent("signers", "--json").stdout)

    assert [(record["reachable"], record["identities"], record["error"]) for record in listed] == [(None, None, None)]
