"""Desktop notifications (serve --notify) with a notify-send stand-in.

The real notify-send (libnotify-bin) needs a notification server on a D-Bus
session bus, which the tests do not have, so a script earlier on PATH takes
its place and records its arguments.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tpmsigner.protocol.messages import ProcessInfo
from tpmsigner.signer.approvers import ApprovalRequest
from tpmsigner.signer.notify import MAX_RUNNING, DesktopNotifier
from tpmsigner.signer.requesttext import MAX_DESTINATION_CHARS, MAX_PURPOSE_CHARS
from tests.support import pid_is_running, wait_until
from tests.support.chain import Chain

PIN = "4711-notify"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"


def write_notify_send(directory: Path, body: str = "") -> Path:
    """Write a notify-send stand-in that appends its arguments to calls.jsonl, then runs ``body``."""
    directory.mkdir(parents=True, exist_ok=True)
    program = directory / "notify-send"
    program.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"with open({str(directory / 'calls.jsonl')!r}, 'a') as calls:\n"
        "    calls.write(json.dumps({'argv': sys.argv[1:], 'pid': os.getpid()}) + '\\n')\n" + body
    )
    program.chmod(0o755)
    return program


def calls(directory: Path) -> list[dict[str, object]]:
    path = directory / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def sign(chain: Chain, public_line: str, namespace: str = "file") -> subprocess.CompletedProcess[str]:
    pub_file = chain.workdir / "work.pub"
    pub_file.write_text(public_line + "\n")
    message = chain.workdir / "message.txt"
    message.write_text("to be signed\n")
    return subprocess.run(
        [SSH_KEYGEN, "-Y", "sign", "-n", namespace, "-f", str(pub_file), str(message)],
        env=chain.agent_environment(),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def start_chain(chain: Chain, path: str) -> str:
    chain.extra_environment["PATH"] = path
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer("--notify")
    chain.start_agent()
    return public_line


def test_signature_and_refusal_are_notified(chain: Chain, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    write_notify_send(bin_dir)
    public_line = start_chain(chain, f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    signed = sign(chain, public_line, namespace="a<b>&c")
    wait_until(lambda: len(calls(bin_dir)) == 1, 10, "the notification of the signature")
    chain.set_decision("deny")
    refused = sign(chain, public_line)
    wait_until(lambda: len(calls(bin_dir)) == 2, 10, "the notification of the refusal")

    assert signed.returncode == 0, signed.stderr
    assert refused.returncode != 0
    first, second = (call["argv"] for call in calls(bin_dir))
    assert first == [
        "--app-name=tpmsigner",
        "--",
        "Signed with work",
        "for sshsig:a&lt;b&gt;&amp;c, from device test-laptop\nrequest #1",
    ]
    assert second == [
        "--app-name=tpmsigner",
        "--",
        "Not signed with work",
        "refused on the signer\nfor sshsig:file, from device test-laptop\nrequest #2",
    ]
    assert chain.signer is not None
    assert f"desktop notifications with {bin_dir / 'notify-send'}" in chain.signer.log_text()


def test_missing_notify_send_turns_notifications_off(chain: Chain, tmp_path: Path) -> None:
    empty_dir = tmp_path / "empty-bin"
    empty_dir.mkdir()
    public_line = start_chain(chain, str(empty_dir))

    first = sign(chain, public_line)
    second = sign(chain, public_line)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert chain.signer is not None
    signer_log = chain.signer.log_text()
    assert signer_log.count("notify-send was not found on PATH, so desktop notifications are off") == 1
    assert "libnotify-bin" in signer_log
    assert signer_log.count("signed with 'work'") == 2


def test_stuck_notify_send_does_not_hold_signature(chain: Chain, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    write_notify_send(bin_dir, "import time\ntime.sleep(100)\n")
    public_line = start_chain(chain, f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    signed = sign(chain, public_line)
    wait_until(lambda: len(calls(bin_dir)) == 1, 10, "the stand-in to start")
    stuck_pid = int(calls(bin_dir)[0]["pid"])  # type: ignore[arg-type]

    assert signed.returncode == 0, signed.stderr
    assert pid_is_running(stuck_pid)
    # Stopping serve kills and reaps the notifications still running.
    assert chain.signer is not None
    chain.signer.stop()
    assert not pid_is_running(stuck_pid)


# ---- the notifier on its own ----------------------------------------------------


def make_request() -> ApprovalRequest:
    return ApprovalRequest(
        request_id=5,
        key_label="work",
        key_fingerprint="SHA256:abc",
        device="laptop <b>",
        process=ProcessInfo(pid=42, uid=1000, executable="/usr/bin/ssh", command_line="ssh host"),
        purpose="ssh-login",
        destination="alice@host\x1b[2J",
        destination_verified=False,
    )


def test_login_body_names_destination(tmp_path: Path) -> None:
    program = write_notify_send(tmp_path)

    async def notify() -> None:
        notifier = DesktopNotifier(str(program))
        notifier.refused(make_request(), "no approval within 60 s")
        await notifier.wait()

    asyncio.run(notify())

    (call,) = calls(tmp_path)
    assert call["argv"] == [
        "--app-name=tpmsigner",
        "--",
        "Not signed with work",
        "no approval within 60 s\nto alice@host\\x1b[2J (NOT verified)\n"
        "for ssh-login, from device laptop &lt;b&gt;\nrequest #5",
    ]


def test_long_fields_are_shortened_in_body(tmp_path: Path) -> None:
    program = write_notify_send(tmp_path)
    # The requester chooses the namespace and the host name, so either could
    # push the rest of the notification out of view.
    request = dataclasses.replace(make_request(), purpose="sshsig:" + "n" * 500, destination="alice@" + "h" * 500)

    async def notify() -> None:
        notifier = DesktopNotifier(str(program))
        notifier.signed(request)
        await notifier.wait()

    asyncio.run(notify())

    (call,) = calls(tmp_path)
    destination_line, purpose_line, request_line = call["argv"][-1].split("\n")
    assert destination_line == "to alice@" + "h" * (MAX_DESTINATION_CHARS - 7) + "\u2026 (NOT verified)"
    assert purpose_line == "for sshsig:" + "n" * (MAX_PURPOSE_CHARS - 8) + "\u2026, from device laptop &lt;b&gt;"
    assert request_line == "request #5"


def test_stuck_notify_send_is_killed_after_timeout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    program = write_notify_send(tmp_path, "import time\ntime.sleep(100)\n")

    async def notify() -> None:
        notifier = DesktopNotifier(str(program), timeout=1.0)
        notifier.signed(make_request())
        await notifier.wait()

    with caplog.at_level(logging.INFO, logger="tpmsigner"):
        asyncio.run(notify())

    (call,) = calls(tmp_path)
    assert not pid_is_running(int(call["pid"]))  # type: ignore[arg-type]
    assert "did not finish within 1 s; killed it" in caplog.text


def test_failing_notify_send_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    program = write_notify_send(tmp_path, "raise SystemExit(1)\n")

    async def notify() -> None:
        notifier = DesktopNotifier(str(program))
        notifier.signed(make_request())
        await notifier.wait()

    with caplog.at_level(logging.INFO, logger="tpmsigner"):
        asyncio.run(notify())

    assert "exited with status 1; is a notification server running" in caplog.text


def test_notifications_beyond_limit_are_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    program = write_notify_send(tmp_path, "import time\ntime.sleep(100)\n")

    async def notify() -> int:
        notifier = DesktopNotifier(str(program))
        for _ in range(MAX_RUNNING + 3):
            notifier.signed(make_request())
        running = notifier.running
        deadline = asyncio.get_running_loop().time() + 10
        while len(calls(tmp_path)) < MAX_RUNNING and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await notifier.close()
        return running

    with caplog.at_level(logging.INFO, logger="tpmsigner"):
        running = asyncio.run(notify())

    assert running == MAX_RUNNING
    assert caplog.text.count("this one is dropped") == 3
    started = calls(tmp_path)
    assert len(started) == MAX_RUNNING
    for call in started:
        assert not pid_is_running(int(call["pid"]))  # type: ignore[arg-type]
