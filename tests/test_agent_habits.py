"""ssh-agent's command-line habits in ``tpmsigner-agent run``: -a, -D, -d, -s, -c and -k."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tpmsigner_agent.shell import CSH, SH, kill_commands, shell_syntax, start_commands
from tests.support import pid_is_running, wait_until
from tests.support.chain import AGENT_COMMAND, Chain
from tpmsigner.errors import ConfigError

PIN = "4711-habits"
AGENT = " ".join(AGENT_COMMAND)


def agent_run(chain: Chain, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AGENT_COMMAND, "--home", str(chain.agent_home), "run", *args],
        env=env or chain.environment(),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def stop_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    wait_until(lambda: not pid_is_running(pid), 10, f"pid {pid} to exit")


def test_bash_eval_starts_lists_and_kills(chain: Chain, short_tmp_path: Path) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    socket_path = short_tmp_path / "with space" / "agent.sock"
    script = f"""
set -e
eval "$({AGENT} --home '{chain.agent_home}' run -s -a '{socket_path}')"
echo "sock=$SSH_AUTH_SOCK"
echo "pid=$SSH_AGENT_PID"
ssh-add -L
eval "$({AGENT} --home '{chain.agent_home}' run -k)"
echo "after=${{SSH_AUTH_SOCK-unset}} ${{SSH_AGENT_PID-unset}}"
"""

    result = subprocess.run(
        ["bash", "-c", script], env=chain.environment(), capture_output=True, text=True, timeout=60
    )

    lines = result.stdout.splitlines()
    pid_line = next((line for line in lines if line.startswith("pid=")), "pid=0")
    agent_pid = int(pid_line.removeprefix("pid="))
    if agent_pid and pid_is_running(agent_pid):
        stop_quietly(agent_pid)
        pytest.fail(f"the agent was still running after run -k:\n{result.stdout}\n{result.stderr}")
    assert result.returncode == 0, result.stderr
    assert f"sock={socket_path}" in lines
    assert lines[0] == f"Agent pid {agent_pid}"
    assert public_line in lines
    assert f"Agent pid {agent_pid} killed" in lines
    assert lines[-1] == "after=unset unset"
    assert not socket_path.exists()


def test_csh_output_sets_and_unsets_variables(chain: Chain, short_tmp_path: Path) -> None:
    chain.pair()
    socket_path = short_tmp_path / "agent.sock"
    environment = {**chain.environment(), "SHELL": "/bin/tcsh"}

    started = agent_run(chain, "-a", str(socket_path), env=environment)
    match = re.fullmatch(
        r"setenv SSH_AUTH_SOCK (\S+);\nsetenv SSH_AGENT_PID (\d+);\necho Agent pid \2;\n", started.stdout
    )
    agent_pid = int(match.group(2)) if match else 0
    try:
        assert started.returncode == 0, started.stderr
        assert match, started.stdout
        assert match.group(1) == str(socket_path)
        killed = agent_run(chain, "-k", env={**environment, "SSH_AGENT_PID": str(agent_pid)})
    finally:
        if agent_pid:
            stop_quietly(agent_pid)

    assert killed.returncode == 0, killed.stderr
    assert killed.stdout == f"unsetenv SSH_AUTH_SOCK;\nunsetenv SSH_AGENT_PID;\necho Agent pid {agent_pid} killed;\n"
    assert not socket_path.exists()


def test_explicit_s_overrides_csh_shell(chain: Chain, short_tmp_path: Path) -> None:
    chain.pair()
    environment = {**chain.environment(), "SHELL": "/bin/csh"}

    started = agent_run(chain, "-s", "-a", str(short_tmp_path / "agent.sock"), env=environment)
    match = re.search(r"SSH_AGENT_PID=(\d+); export SSH_AGENT_PID;", started.stdout)
    if match:
        stop_quietly(int(match.group(1)))

    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith(f"SSH_AUTH_SOCK={short_tmp_path / 'agent.sock'}; export SSH_AUTH_SOCK;\n")
    assert match


def test_kill_with_pid_file(chain: Chain, short_tmp_path: Path) -> None:
    chain.pair()
    pid_file = short_tmp_path / "agent.pid"
    started = agent_run(chain, "-a", str(short_tmp_path / "agent.sock"), "--pid-file", str(pid_file))
    assert started.returncode == 0, started.stderr
    agent_pid = int(pid_file.read_text())
    environment = chain.environment()
    environment.pop("SSH_AGENT_PID", None)

    try:
        assert oct(pid_file.stat().st_mode & 0o777) == oct(0o600)
        assert f"SSH_AGENT_PID={agent_pid}; export SSH_AGENT_PID;" in started.stdout
        killed = agent_run(chain, "-s", "-k", "--pid-file", str(pid_file), env=environment)
    finally:
        stop_quietly(agent_pid)

    assert killed.returncode == 0, killed.stderr
    assert killed.stdout == f"unset SSH_AUTH_SOCK;\nunset SSH_AGENT_PID;\necho Agent pid {agent_pid} killed;\n"
    assert not pid_file.exists()
    assert not pid_is_running(agent_pid)


def test_kill_refuses_a_process_that_is_not_the_agent(chain: Chain) -> None:
    other = subprocess.Popen(["sleep", "60"])
    try:
        result = agent_run(chain, "-k", env={**chain.environment(), "SSH_AGENT_PID": str(other.pid)})
        still_running = other.poll() is None
    finally:
        other.kill()
        other.wait(timeout=10)

    assert result.returncode == 1
    assert f"pid {other.pid} is not a tpmsigner-agent run process" in result.stderr
    assert "'sleep 60'" in result.stderr
    assert still_running
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "SSH_AGENT_PID is not set"),
        ("", "SSH_AGENT_PID is not set"),
        ("-1", "SSH_AGENT_PID contains '-1', which is not a process id"),
        ("0", "SSH_AGENT_PID contains '0', which is not a process id"),
        ("12ab", "SSH_AGENT_PID contains '12ab', which is not a process id"),
    ],
)
def test_kill_rejects_missing_or_invalid_pid(chain: Chain, value: str | None, message: str) -> None:
    environment = chain.environment()
    environment.pop("SSH_AGENT_PID", None)
    if value is not None:
        environment["SSH_AGENT_PID"] = value

    result = agent_run(chain, "-k", env=environment)

    assert result.returncode == 1
    assert message in result.stderr
    assert result.stdout == ""


def test_kill_of_a_stopped_agent_says_so(chain: Chain) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=10)

    result = agent_run(chain, "-k", env={**chain.environment(), "SSH_AGENT_PID": str(gone.pid)})

    assert result.returncode == 1
    assert f"no process with pid {gone.pid} is running" in result.stderr


def test_foreground_with_s_prints_socket_without_pid_variable(chain: Chain, short_tmp_path: Path) -> None:
    chain.pair()
    socket_path = short_tmp_path / "agent.sock"
    log_file = chain.workdir / "foreground.log"
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            [*AGENT_COMMAND, "--home", str(chain.agent_home), "run", "-D", "-s", "-a", str(socket_path)],
            env=chain.environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        second = process.stdout.readline()
        wait_until(lambda: "agent listening on" in log_file.read_text(), 15, "the agent to listen")
    finally:
        process.terminate()
        rest = process.communicate(timeout=10)[0]

    assert first == f"SSH_AUTH_SOCK={socket_path}; export SSH_AUTH_SOCK;\n"
    assert second == f"echo Agent pid {process.pid};\n"
    assert rest == ""
    assert process.returncode == 0
    assert not socket_path.exists()


def test_debug_flag_stays_in_foreground_and_logs_debug(chain: Chain, short_tmp_path: Path) -> None:
    chain.pair()
    socket_path = short_tmp_path / "agent.sock"
    log_file = chain.workdir / "debug.log"
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            [*AGENT_COMMAND, "--home", str(chain.agent_home), "run", "-d", "-a", str(socket_path)],
            env=chain.environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    try:
        wait_until(lambda: "agent listening on" in log_file.read_text(), 15, "the agent to listen")
        # ssh-add -D is refused without an upstream agent, which the agent logs at debug level.
        removed = subprocess.run(
            ["ssh-add", "-D"],
            env={**chain.environment(), "SSH_AUTH_SOCK": str(socket_path)},
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        running = process.poll() is None
    finally:
        process.terminate()
        process.communicate(timeout=10)

    assert running
    assert removed.returncode != 0
    assert "DEBUG tpmsigner_agent.server: replying SSH_AGENT_FAILURE to message type 19" in log_file.read_text()


def test_log_file_is_rejected_in_the_foreground(chain: Chain, short_tmp_path: Path) -> None:
    result = agent_run(chain, "-D", "--log-file", str(short_tmp_path / "log"), "-a", str(short_tmp_path / "s"))

    assert result.returncode == 1
    assert "--log-file applies to the background mode" in result.stderr


# ---- the shell text itself ------------------------------------------------------


@pytest.mark.parametrize(
    ("shell", "expected"),
    [("/bin/bash", SH), ("/usr/bin/zsh", SH), ("/bin/csh", CSH), ("/usr/bin/tcsh", CSH), ("", SH)],
)
def test_shell_syntax_follows_shell_variable(shell: str, expected: str) -> None:
    assert shell_syntax(None, {"SHELL": shell}) == expected


def test_shell_syntax_prefers_explicit_choice() -> None:
    assert shell_syntax(SH, {"SHELL": "/bin/csh"}) == SH
    assert shell_syntax(CSH, {"SHELL": "/bin/bash"}) == CSH


def test_start_commands_quote_paths_for_each_shell() -> None:
    assert start_commands(SH, "/tmp/a b/agent.sock", 42) == (
        "SSH_AUTH_SOCK='/tmp/a b/agent.sock'; export SSH_AUTH_SOCK;\n"
        "SSH_AGENT_PID=42; export SSH_AGENT_PID;\n"
        "echo Agent pid 42;\n"
    )
    assert start_commands(CSH, "/tmp/a b/agent.sock", 42) == (
        "setenv SSH_AUTH_SOCK '/tmp/a b/agent.sock';\nsetenv SSH_AGENT_PID 42;\necho Agent pid 42;\n"
    )


@pytest.mark.parametrize(("syntax", "path"), [(SH, "/tmp/a\nb"), (CSH, "/tmp/a\nb"), (CSH, "/tmp/a!b")])
def test_start_commands_reject_paths_a_shell_cannot_read(syntax: str, path: str) -> None:
    with pytest.raises(ConfigError, match="choose another"):
        start_commands(syntax, path, 42)


def test_kill_commands_match_ssh_agent() -> None:
    assert kill_commands(SH, 7) == "unset SSH_AUTH_SOCK;\nunset SSH_AGENT_PID;\necho Agent pid 7 killed;\n"
    assert kill_commands(CSH, 7) == "unsetenv SSH_AUTH_SOCK;\nunsetenv SSH_AGENT_PID;\necho Agent pid 7 killed;\n"


def test_unwritable_pid_file_stops_the_new_agent(chain: Chain, short_tmp_path: Path) -> None:
    chain.pair()
    socket_path = short_tmp_path / "agent.sock"
    pid_file = short_tmp_path / "missing-directory" / "agent.pid"

    result = agent_run(chain, "-a", str(socket_path), "--pid-file", str(pid_file))

    assert result.returncode == 1
    assert f"cannot write {pid_file}" in result.stderr
    assert result.stdout == ""
    # The background agent was stopped, and its socket removed.
    assert not socket_path.exists()
