"""Log lines of both programs: journald and terminal forms, -v and -q, no secrets, rate limits."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import LOCALHOST, wait_until
from tests.support.chain import AGENT_COMMAND, Chain
from tests.test_agent_input import RawAgentClient
from tpmsigner.logsetup import OneLineFormatter, level_for, syslog_priority
from tpmsigner.protocol import channel
from tpmsigner.protocol.channel import StaticKey, parse_public_key

PIN = "4711-logging-pin"
JOURNAL_LINE = re.compile(r"<[2-7]>(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: \S")
TERMINAL_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: \S")


def run_agent_until_listening(
    chain: Chain,
    socket_path: Path,
    log_file: Path,
    *args: str,
    run_args: tuple[str, ...] = (),
    journal_stream: str | None = None,
) -> str:
    """Start ``tpmsigner-agent ARGS run -D RUN_ARGS``, wait until it answers, stop it, and return its stderr.

    ``journal_stream`` is the JOURNAL_STREAM value to set: "stderr" for
    the device and inode of the agent's stderr, as systemd sets it, or any
    other text as is.
    """
    with open(log_file, "wb") as log:
        environment = chain.environment()
        environment.pop("JOURNAL_STREAM", None)
        if journal_stream == "stderr":
            info = os.fstat(log.fileno())
            environment["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        elif journal_stream is not None:
            environment["JOURNAL_STREAM"] = journal_stream
        process = subprocess.Popen(
            [*AGENT_COMMAND, "--home", str(chain.agent_home), *args, "run", "-D", "-a", str(socket_path), *run_args],
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:

        def answers() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the agent exited with {process.returncode}: {log_file.read_text()}")
            listed = subprocess.run(
                ["ssh-add", "-l"],
                env={**chain.environment(), "SSH_AUTH_SOCK": str(socket_path)},
                capture_output=True,
                timeout=30,
            )
            return listed.returncode in (0, 1)

        wait_until(answers, 15, "the agent to answer")
    finally:
        process.terminate()
        process.wait(timeout=10)
    return log_file.read_text()


def test_journal_lines_carry_priority_without_timestamp(chain: Chain, short_tmp_path: Path) -> None:
    text = run_agent_until_listening(chain, short_tmp_path / "agent.sock", chain.workdir / "journal.log", journal_stream="stderr")

    lines = text.splitlines()
    assert lines
    for line in lines:
        assert JOURNAL_LINE.match(line), line
    assert any(line.startswith("<4>WARNING tpmsigner_agent: no signer is trusted yet") for line in lines)
    assert any(line.startswith("<6>INFO tpmsigner_agent: agent listening on") for line in lines)


def test_terminal_lines_carry_timestamp(chain: Chain, short_tmp_path: Path) -> None:
    text = run_agent_until_listening(chain, short_tmp_path / "agent.sock", chain.workdir / "terminal.log")

    lines = text.splitlines()
    assert lines
    for line in lines:
        assert TERMINAL_LINE.match(line), line
    assert any(" INFO tpmsigner_agent: agent listening on " in line for line in lines)


def test_stale_journal_stream_is_not_trusted(chain: Chain, short_tmp_path: Path) -> None:
    # A JOURNAL_STREAM inherited from a service whose stderr was redirected
    # names another file than this stderr.
    text = run_agent_until_listening(
        chain, short_tmp_path / "agent.sock", chain.workdir / "stale.log", journal_stream="1:1"
    )

    lines = text.splitlines()
    assert lines
    for line in lines:
        assert TERMINAL_LINE.match(line), line


def test_quiet_agent_logs_only_warnings(chain: Chain, short_tmp_path: Path) -> None:
    text = run_agent_until_listening(chain, short_tmp_path / "agent.sock", chain.workdir / "quiet.log", "-q")

    assert "WARNING tpmsigner_agent: no signer is trusted yet" in text
    assert "INFO" not in text
    assert "agent listening on" not in text


def test_verbose_after_run_logs_debug(chain: Chain, short_tmp_path: Path) -> None:
    default = run_agent_until_listening(chain, short_tmp_path / "agent.sock", chain.workdir / "default.log")
    verbose = run_agent_until_listening(
        chain, short_tmp_path / "agent.sock", chain.workdir / "verbose.log", run_args=("-v",)
    )

    assert "DEBUG" not in default
    # asyncio logs its event loop's selector at debug level.
    assert "DEBUG asyncio: Using selector" in verbose


@pytest.mark.parametrize("program", ["tpmsigner", "tpmsigner-agent"])
def test_verbose_and_quiet_together_are_rejected(program: str) -> None:
    module = "tpmsigner.cli" if program == "tpmsigner" else "tpmsigner_agent.cli"
    subcommand = ["serve", "--listen", "127.0.0.1:1", "--approver", "tty"] if program == "tpmsigner" else ["run"]

    result = subprocess.run(
        [sys.executable, "-m", module, "-v", *subcommand, "-q"], capture_output=True, text=True, timeout=30
    )

    assert result.returncode == 2
    assert f"{program}: error: -v and -q cannot be used together" in result.stderr


def test_verbose_logs_show_no_pin(chain: Chain, sshd_factory) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer("-v")
    chain.start_agent("-v")
    sshd = sshd_factory(authorized_keys=[public_line])

    approved = subprocess.run(
        sshd.ssh_command(chain.agent_socket, "true"), capture_output=True, text=True, timeout=60
    )
    chain.set_approver_pin("wrong-" + PIN)
    refused = subprocess.run(
        sshd.ssh_command(chain.agent_socket, "true"), capture_output=True, text=True, timeout=60
    )

    assert approved.returncode == 0, approved.stderr
    assert refused.returncode == 255
    assert chain.signer is not None and chain.agent is not None
    signer_log, agent_log = chain.signer.log_text(), chain.agent.log_text()
    assert "DEBUG" in signer_log
    assert "DEBUG tpmsigner_agent" in agent_log
    assert PIN not in signer_log
    assert PIN not in agent_log


def test_repeated_bad_lengths_are_rate_limited(chain: Chain) -> None:
    chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    agent = chain.start_agent()

    for _ in range(30):
        client = RawAgentClient(chain.agent_socket)
        try:
            client.sock.sendall(struct.pack(">I", 0xFFFFFFF0))
            assert client.read_reply() == b"\x05"
        finally:
            client.close()

    warnings = [line for line in agent.log_text().splitlines() if "client sent a message length of" in line]
    assert len(warnings) == 10
    assert chain.ssh_add("-L").returncode == 0


def test_agent_stop_is_info_on_signer(chain: Chain) -> None:
    chain.keygen("work", PIN)
    chain.pair()
    signer = chain.start_signer()
    agent = chain.start_agent()
    assert chain.ssh_add("-L").returncode == 0

    agent.stop()
    wait_until(lambda: "disconnected" in signer.log_text(), 10, "the signer to log the agent's disconnection")

    closed = [line for line in signer.log_text().splitlines() if "device 'test-laptop': channel closed" in line]
    assert len(closed) == 1
    assert " INFO " in closed[0]
    assert "the peer closed the connection" in closed[0]
    assert " WARNING " not in signer.log_text()


def test_garbage_frame_is_warning_on_signer(chain: Chain) -> None:
    chain.pair()
    signer = chain.start_signer()
    agent_key = StaticKey.load_or_create(chain.agent_home / "noise-static-key.pem")
    signer_key = parse_public_key(chain.tpmsigner("id").stdout)

    async def send_garbage() -> None:
        reader, writer = await asyncio.open_connection(LOCALHOST, chain.signer_port)
        try:
            await channel.initiate(reader, writer, agent_key, signer_key)
            writer.write(struct.pack(">H", 32) + bytes(32))
            await writer.drain()
            # The signer closes the channel after the frame fails authentication.
            assert await asyncio.wait_for(reader.read(), 10) == b""
        finally:
            writer.close()

    asyncio.run(send_garbage())
    wait_until(lambda: "disconnected" in signer.log_text(), 10, "the signer to close the connection")

    closed = [line for line in signer.log_text().splitlines() if "device 'test-laptop': channel closed" in line]
    assert len(closed) == 1
    assert " WARNING " in closed[0]
    assert "failed authentication" in closed[0]


# ---- the formatter ------------------------------------------------------------------


def make_record(message: str, level: int = logging.WARNING, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("tpmsigner_agent.server", level, __file__, 1, message, (), exc_info)


def test_formatter_escapes_line_breaks_from_peers() -> None:
    line = OneLineFormatter(journal=True).format(make_record("peer said 'a\nINFO forged: b\r'"))

    assert line == "<4>WARNING tpmsigner_agent.server: peer said 'a\\nINFO forged: b\\r'"


def test_formatter_keeps_traceback_on_one_line() -> None:
    try:
        raise ValueError("broken")
    except ValueError:
        record = make_record("handling failed", logging.ERROR, sys.exc_info())

    line = OneLineFormatter(journal=False).format(record)

    assert "\n" not in line
    assert TERMINAL_LINE.match(line)
    assert "handling failed\\nTraceback (most recent call last):" in line
    assert line.endswith("ValueError: broken")


@pytest.mark.parametrize(
    ("level", "priority"),
    [(logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3), (logging.CRITICAL, 2)],
)
def test_syslog_priority_of_each_level(level: int, priority: int) -> None:
    assert syslog_priority(level) == priority


def test_level_for_options() -> None:
    assert level_for(verbose=True, quiet=False) == logging.DEBUG
    assert level_for(verbose=False, quiet=True) == logging.WARNING
    assert level_for(verbose=False, quiet=False) == logging.INFO


# ---- text from peers in the log ----------------------------------------------------

# Signs with the first key the agent at argv[1] lists; the other arguments
# only make the command line that the agent reports for this process.
SIGNING_CLIENT = """
import asyncio, sys
import asyncssh

async def sign():
    async with asyncssh.connect_agent(sys.argv[1]) as agent:
        keys = await agent.get_keys()
        await keys[0].sign_async(b"data")

asyncio.run(asyncio.wait_for(sign(), 60))
"""
HOSTILE_ARGUMENT = "\x1b[2J\x1b]0;forged title\x07\x9b31m\u202eevil\x7f"
CONTROL_CHARACTERS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]")


def test_control_characters_from_clients_are_escaped_in_logs(chain: Chain) -> None:
    chain.keygen("work", PIN)
    chain.pair()
    signer = chain.start_signer()
    agent = chain.start_agent()

    subprocess.run(
        [sys.executable, "-c", SIGNING_CLIENT, str(chain.agent_socket), HOSTILE_ARGUMENT],
        env=chain.environment(),
        check=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )

    for daemon in (signer, agent):
        log = daemon.log_file.read_bytes().decode("utf-8")
        assert "forged title" in log, daemon.name
        assert CONTROL_CHARACTERS.search(log) is None, daemon.name
        assert "\\x1b[2J\\x1b]0;forged title\\x07\\x9b31m\\u202eevil\\x7f" in log, daemon.name
